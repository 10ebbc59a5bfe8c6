//! The bytes tasks write: a deterministic function of (job, stage, task, offset), so a
//! consumer can check every byte it reads without keeping a copy.

/// Identifies one task's output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamKey(u64);

impl StreamKey {
    /// The stream of task `task` of stage `stage` of the job with index `job`, in a run
    /// seeded with `seed`.
    pub fn new(seed: u64, job: usize, stage: usize, task: usize) -> Self {
        let mut k = mix(seed ^ 0x6661_7270_6f6f_6c21);
        k = mix(k ^ job as u64);
        k = mix(k ^ ((stage as u64) << 32 | task as u64));
        StreamKey(k)
    }

    /// The 8-byte word at word index `w` of the stream.
    fn word(self, w: u64) -> u64 {
        mix(self.0 ^ w.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the stream's bytes starting at byte `offset`.
pub fn fill(key: StreamKey, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0usize;
    // Unaligned head, byte by byte.
    while i < buf.len() && pos % 8 != 0 {
        buf[i] = key.word(pos / 8).to_le_bytes()[(pos % 8) as usize];
        i += 1;
        pos += 1;
    }
    // Whole words.
    let mut chunks = buf[i..].chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&key.word(pos / 8).to_le_bytes());
        pos += 8;
    }
    // Tail.
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let w = key.word(pos / 8).to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&w[..n]);
    }
}

/// Checks `data` against the stream's bytes from `offset`; returns the offset of the
/// first wrong byte. `scratch` is reused between calls.
pub fn check(key: StreamKey, offset: u64, data: &[u8], scratch: &mut Vec<u8>) -> Option<u64> {
    scratch.clear();
    scratch.resize(data.len(), 0);
    fill(key, offset, scratch);
    if scratch.as_slice() == data {
        return None;
    }
    data.iter()
        .zip(scratch.iter())
        .position(|(a, b)| a != b)
        .map(|i| offset + i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiment_fill_is_position_addressable() {
        let k = StreamKey::new(1, 2, 3, 4);
        let mut whole = vec![0u8; 1000];
        fill(k, 0, &mut whole);
        for (start, len) in [(0usize, 1000usize), (3, 10), (5, 900), (999, 1), (8, 16)] {
            let mut part = vec![0u8; len];
            fill(k, start as u64, &mut part);
            assert_eq!(&part[..], &whole[start..start + len]);
        }
        let mut scratch = Vec::new();
        assert_eq!(check(k, 0, &whole, &mut scratch), None);
        whole[77] ^= 1;
        assert_eq!(check(k, 0, &whole, &mut scratch), Some(77));
        assert_ne!(StreamKey::new(1, 2, 3, 4), StreamKey::new(1, 2, 4, 3));
    }
}
