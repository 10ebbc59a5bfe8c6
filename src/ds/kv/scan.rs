//! Reading a whole [`Kv`] without locks (for snapshots to the persistent tier).

use super::bucket::{self, BUCKET_BYTES};
use super::record::{decode, Decoded, Value};
use super::{slot_place, Kv, PART_HEADER};
use crate::client::BlockHandle;
use crate::ds::{is_stale, DsError};

/// Attempts at reading one partition whose writers keep tearing it.
const PARTITION_ATTEMPTS: u32 = 1_000;
/// Attempts at a whole scan that partitions keep moving under.
const SCAN_ATTEMPTS: u32 = 100;

/// Key-value pairs.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A partition's pairs as found: inline values, or remote ones to fetch.
type Found = Vec<(Vec<u8>, Value)>;

impl Kv {
    /// Every key and value in the table, in no particular order. Takes no lock: each
    /// partition is read whole and accepted only when every bucket and record in it
    /// passes its checksum. Under concurrent writers each key's value is one it held
    /// at some moment during the scan (not one global snapshot).
    pub fn entries(&self) -> Result<Pairs, DsError> {
        'scan: for _ in 0..SCAN_ATTEMPTS {
            self.reload()?;
            let mut kids: Vec<u64> = self.map.read().entries.iter().map(|e| e >> 8).collect();
            kids.dedup();
            kids.sort_unstable();
            kids.dedup();
            let mut out = Vec::new();
            for child in kids {
                let Some(part) = self.partition(child)? else {
                    continue 'scan;
                };
                match self.partition_pairs(&part) {
                    Ok(found) => {
                        for (key, value) in found {
                            let value = match value {
                                Value::Inline(v) => Some(v),
                                // Replaced meanwhile: look the key up again.
                                remote => match self.resolve(remote)? {
                                    super::Attempt::Done(v) => v,
                                    _ => self.get(&key)?,
                                },
                            };
                            if let Some(v) = value {
                                out.push((key, v));
                            }
                        }
                    }
                    Err(DsError::Client(e)) if is_stale(&e) => {
                        self.parts.lock().remove(&child);
                        continue 'scan;
                    }
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        Err(self.corrupt(format!(
            "the table kept repartitioning during {SCAN_ATTEMPTS} attempts to read it whole"
        )))
    }

    /// The pairs of one partition, read whole until every bucket and record validates.
    fn partition_pairs(&self, part: &BlockHandle) -> Result<Found, DsError> {
        let mut image = vec![0u8; part.len() as usize];
        for _ in 0..PARTITION_ATTEMPTS {
            part.read(0, &mut image)?;
            if let Some(found) = self.parse_partition(&image) {
                return Ok(found);
            }
            std::thread::yield_now();
        }
        Err(self.corrupt(format!(
            "a partition failed its checksums in {PARTITION_ATTEMPTS} whole reads"
        )))
    }

    /// The pairs in a partition image; `None` when something in it is torn.
    fn parse_partition(&self, image: &[u8]) -> Option<Found> {
        let mut out = Vec::new();
        for bi in 0..self.buckets {
            let b = PART_HEADER + bi * BUCKET_BYTES;
            let raw: &[u8; BUCKET_BYTES as usize] = image
                .get(b as usize..(b + BUCKET_BYTES) as usize)?
                .try_into()
                .ok()?;
            let bucket = bucket::decode(b, raw)?;
            for s in bucket.slots.iter().filter(|&&s| s != 0) {
                let (off, len) = slot_place(*s);
                let bytes = image.get(off as usize..(off + len) as usize)?;
                match decode(bytes) {
                    Decoded::Record(r) => out.push((r.key, r.value)),
                    Decoded::Bad => return None,
                }
            }
        }
        Some(out)
    }
}
