//! Local buffers for one-sided operations.

use std::ops::{Deref, DerefMut};

/// A local, 64-byte aligned buffer. Backends that need registered memory (verbs) hand
/// these out from a registered pool so that operations on them need no bounce copy.
pub struct LocalBuf {
    /// Keeps a registration of `words` alive (verbs). Declared first so that it is
    /// dropped (deregistered) before the memory it covers is freed.
    registration: Option<Box<dyn std::any::Any + Send + Sync>>,
    words: Vec<Align64>,
    len: usize,
    /// Registration handle (lkey) on backends that register memory; `None` otherwise.
    pub lkey: Option<u32>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl LocalBuf {
    /// A zeroed buffer of `len` bytes, not registered with any device.
    pub fn new(len: usize) -> Self {
        let words = vec![Align64([0; 64]); len.div_ceil(64)];
        Self {
            registration: None,
            words,
            len,
            lkey: None,
        }
    }

    /// Attaches a registration of this buffer's memory (`lkey` and a handle that keeps it
    /// alive, dropped before the memory is freed). Used by backends that register memory.
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) fn set_registration(
        &mut self,
        lkey: u32,
        handle: Box<dyn std::any::Any + Send + Sync>,
    ) {
        self.lkey = Some(lkey);
        self.registration = Some(handle);
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for LocalBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let ptr = self.words.as_ptr().cast::<u8>();
        // SAFETY: `words` owns at least `len` initialised bytes (Align64 is plain bytes,
        // repr(C) with no padding), and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(ptr, self.len) }
    }
}

impl DerefMut for LocalBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let ptr = self.words.as_mut_ptr().cast::<u8>();
        // SAFETY: as in `deref`, and the unique borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.len) }
    }
}

impl std::fmt::Debug for LocalBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBuf")
            .field("len", &self.len)
            .field("lkey", &self.lkey)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        let mut b = LocalBuf::new(100);
        assert_eq!(b.len(), 100);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        b[99] = 7;
        assert_eq!(b[99], 7);
        assert!(LocalBuf::new(0).is_empty());
    }
}
