//! Batched operations of [`Kv`]: many keys per round trip.

use super::bucket::{self, BUCKET_BYTES, FROZEN};
use super::record::{decode, Decoded, Value};
use super::{hash, Kv};
use crate::client::BlockHandle;
use crate::ds::DsError;

/// One key of a batched get, as far as the batch got with it.
struct Probe {
    /// Index of the key in the caller's slice.
    at: usize,
    h: u64,
    part: BlockHandle,
    /// Bucket offset.
    b: u64,
}

impl Kv {
    /// The values of `keys`, in order. Two round trips per memory node for the whole
    /// batch (every key's bucket, then every matching record) instead of two per key;
    /// keys whose partition is moving, whose record is being rewritten, or whose value
    /// lives in a block of its own are then looked up one by one with [`Kv::get`].
    /// Each value is linearizable on its own, as with `get`; the batch is not atomic.
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Vec<u8>>>, DsError> {
        let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; keys.len()];
        let mut probes = Vec::with_capacity(keys.len());
        for (at, key) in keys.iter().enumerate() {
            let h = hash(key.as_ref());
            let route = self.route(h)?;
            if let Some(part) = self.partition(route.child)? {
                let b = self.bucket_off(h);
                probes.push(Probe { at, h, part, b });
            }
        }
        probes.sort_by_key(|p| p.part.transport_key());
        // Round trip 1: every bucket.
        let mut ok = vec![false; probes.len()];
        let mut raws = vec![[0u8; BUCKET_BYTES as usize]; probes.len()];
        {
            let handles: Vec<&BlockHandle> = probes.iter().map(|p| &p.part).collect();
            let mut ops = Vec::with_capacity(probes.len());
            for (p, raw) in probes.iter().zip(raws.iter_mut()) {
                ops.push(p.part.read_op(p.b, raw)?);
            }
            for (start, end, result) in BlockHandle::execute_many(&handles, &mut ops)? {
                if result.is_ok() {
                    ok[start..end].iter_mut().for_each(|o| *o = true);
                }
            }
        }
        // Round trip 2: the records whose fingerprint matches.
        let mut reads: Vec<(usize, u64, Vec<u8>)> = Vec::new(); // (probe, offset, buf)
        for (j, p) in probes.iter().enumerate() {
            if !ok[j] {
                continue;
            }
            // Frozen (moving) or torn (being rewritten) buckets: one by one below.
            let Some(bk) = bucket::decode(p.b, &raws[j]).filter(|bk| bk.lock != FROZEN) else {
                continue;
            };
            let cands = self.candidates(&p.part, p.h, &bk.slots);
            if cands.is_empty() {
                out[p.at] = Some(None);
            }
            for (_, off, len) in cands {
                reads.push((j, off, vec![0u8; len as usize]));
            }
        }
        if !reads.is_empty() {
            let handles: Vec<&BlockHandle> = reads.iter().map(|r| &probes[r.0].part).collect();
            let mut ops = Vec::with_capacity(reads.len());
            for (r, h) in reads.iter_mut().zip(&handles) {
                ops.push(h.read_op(r.1, &mut r.2)?);
            }
            let mut done = vec![false; ops.len()];
            for (start, end, result) in BlockHandle::execute_many(&handles, &mut ops)? {
                if result.is_ok() {
                    done[start..end].iter_mut().for_each(|d| *d = true);
                }
            }
            drop(ops);
            // Per probe: the key's record, a torn candidate (retry alone), or absent.
            let mut verdict: Vec<Option<Verdict>> = (0..probes.len()).map(|_| None).collect();
            for ((j, _, buf), fine) in reads.into_iter().zip(done) {
                let key = keys[probes[j].at].as_ref();
                let v = verdict[j].get_or_insert(Verdict::Absent);
                if matches!(v, Verdict::Found(_)) {
                    continue;
                }
                if !fine {
                    *v = Verdict::Alone;
                    continue;
                }
                match decode(&buf) {
                    Decoded::Record(r) if r.key == key => *v = Verdict::Found(r.value),
                    Decoded::Record(_) => {}
                    Decoded::Bad => *v = Verdict::Alone,
                }
            }
            for (j, v) in verdict.into_iter().enumerate() {
                match v {
                    Some(Verdict::Found(Value::Inline(bytes))) => {
                        out[probes[j].at] = Some(Some(bytes))
                    }
                    Some(Verdict::Absent) => out[probes[j].at] = Some(None),
                    // Remote values, torn records: one by one.
                    Some(Verdict::Found(Value::Remote { .. }) | Verdict::Alone) | None => {}
                }
            }
        }
        keys.iter()
            .zip(out)
            .map(|(k, v)| match v {
                Some(v) => Ok(v),
                None => self.get(k.as_ref()),
            })
            .collect()
    }
}

/// What the batch learned about one key.
enum Verdict {
    Found(Value),
    Absent,
    /// Look it up on its own.
    Alone,
}
