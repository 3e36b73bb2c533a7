//! f32 weights in transparent huge pages. The CPU backend widens some weights to f32 (F32
//! files, and every weight of the training backend) into memory of its own; decode reads all of
//! it once per token, so it is bound by how fast the cores stream it. Backed by 2 MB pages
//! instead of 4 KB ones, the same reads ran 18-20% faster on this project's 2-core EPYC (a
//! 530 MB row-by-row f32 matrix-vector product, 2 threads: 21.7-22.5 vs 25.7-26.6 GB/s; a plain
//! read 30 vs 35-37 GB/s): fewer TLB misses and page walks under the streams.
//!
//! Weights are packed one after another into 2 MB-aligned anonymous mappings of [`CHUNK`]
//! bytes (a weight of more than half that gets one of its own) advised `MADV_HUGEPAGE` (Linux;
//! elsewhere, and where the advice is refused, the same memory in ordinary pages). A chunk is unmapped when the last weight in it is
//! dropped (the chunk being filled too: it is let go when its last weight goes). Only touched
//! memory is resident: the unused end of a chunk costs address space, and at most one partly
//! used 2 MB page.

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

use crate::error::{Error, Result};

/// Bytes per chunk (weights larger than this get a chunk of their own).
const CHUNK: usize = 64 << 20;
/// The huge page size the chunks are aligned to.
const HUGE: usize = 2 << 20;
/// Each weight starts on a cache line.
const ALIGN: usize = 64;

/// One anonymous mapping; `base` is its first 2 MB-aligned byte, `len` bytes usable from there.
struct Chunk {
    _map: MmapMut,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the chunk; every weight writes only its own range, once,
// before it is shared (see `HugeF32::filled`), and reads it after.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(len: usize) -> Result<Chunk> {
        let len = len.div_ceil(HUGE) * HUGE;
        let mut map = MmapMut::map_anon(len + HUGE).map_err(|e| Error::Backend {
            backend: "cpu",
            msg: format!("mapping {} MB for f32 weights: {e}", (len + HUGE) >> 20),
        })?;
        let start = map.as_mut_ptr();
        let skip = start.align_offset(HUGE);
        #[cfg(target_os = "linux")]
        {
            // Refused where transparent huge pages are off or unknown: ordinary pages then.
            let _ = map.advise_range(memmap2::Advice::HugePage, skip, len);
        }
        // SAFETY: skip < HUGE, so base..base + len lies inside the mapping of len + HUGE bytes.
        Ok(Chunk { base: unsafe { start.add(skip) }, len, _map: map })
    }
}

/// Where weights are packed: the chunk being filled, and the bytes of it already given out.
/// Every clone and drop of a chunk's `Arc` happens under the lock, so its count is exact there.
struct Arena {
    open: Mutex<Option<(Arc<Chunk>, usize)>>,
}

impl Arena {
    const fn new() -> Arena {
        Arena { open: Mutex::new(None) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Arc<Chunk>, usize)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `len` values written by `fill` (which gets them zeroed).
    fn filled(&'static self, len: usize, fill: impl FnOnce(&mut [f32])) -> Result<HugeF32> {
        let bytes = len * 4;
        let (chunk, offset) = {
            let mut open = self.lock();
            match open.as_mut() {
                Some((c, used)) if *used + bytes <= c.len => {
                    let at = *used;
                    *used = (at + bytes).div_ceil(ALIGN) * ALIGN;
                    (c.clone(), at)
                }
                _ if bytes > CHUNK / 2 => (Arc::new(Chunk::new(bytes)?), 0),
                _ => {
                    let c = Arc::new(Chunk::new(CHUNK)?);
                    *open = Some((c.clone(), bytes.div_ceil(ALIGN) * ALIGN));
                    (c, 0)
                }
            }
        };
        // SAFETY: offset..offset + bytes lies in the chunk, is 64-byte aligned, and no other
        // weight was given any of it; fresh anonymous memory reads as zeros, a valid f32.
        let values = unsafe { std::slice::from_raw_parts_mut(chunk.base.add(offset) as *mut f32, len) };
        fill(values);
        Ok(HugeF32 { chunk: ManuallyDrop::new(chunk), offset, len, arena: self })
    }
}

static ARENA: Arena = Arena::new();

/// `len` f32 values in huge-page-backed memory.
pub struct HugeF32 {
    /// Dropped in `drop`, under the arena's lock.
    chunk: ManuallyDrop<Arc<Chunk>>,
    offset: usize,
    len: usize,
    arena: &'static Arena,
}

impl HugeF32 {
    /// `len` values written by `fill` (which gets them zeroed).
    pub fn filled(len: usize, fill: impl FnOnce(&mut [f32])) -> Result<HugeF32> {
        ARENA.filled(len, fill)
    }
}

impl Drop for HugeF32 {
    fn drop(&mut self) {
        let mut open = self.arena.lock();
        // The last weight in the chunk being filled: let the chunk go with it.
        if open.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, &self.chunk) && Arc::strong_count(c) == 2) {
            *open = None;
        }
        // SAFETY: dropped once, here; the field is not used again.
        unsafe { ManuallyDrop::drop(&mut self.chunk) };
    }
}

impl std::ops::Deref for HugeF32 {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        // SAFETY: written once by `filled` before this value existed; read-only since.
        unsafe { std::slice::from_raw_parts(self.chunk.base.add(self.offset) as *const f32, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_keep_their_values_and_do_not_overlap() {
        let sizes = [1usize, 17, 1000, 3 << 18, 5 << 20, 7];
        let ws: Vec<HugeF32> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                HugeF32::filled(n, |v| v.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 7 + j) as f32)).unwrap()
            })
            .collect();
        for (i, w) in ws.iter().enumerate() {
            assert_eq!(w.len(), sizes[i]);
            assert_eq!(w.as_ptr() as usize % ALIGN, 0);
            assert!(w.iter().enumerate().all(|(j, &x)| x == (i * 7 + j) as f32), "weight {i} changed");
        }
        drop(ws);
        let empty = HugeF32::filled(0, |_| {}).unwrap();
        assert!(empty.is_empty());
    }

    /// The chunk being filled is unmapped with its last weight, not kept for later ones.
    #[test]
    fn the_open_chunk_goes_with_its_last_weight() {
        // An arena of its own: the global one is shared with tests running in parallel.
        let arena: &'static Arena = Box::leak(Box::new(Arena::new()));
        let a = arena.filled(1000, |v| v.fill(1.0)).unwrap();
        let b = arena.filled(1000, |v| v.fill(2.0)).unwrap();
        let chunk = Arc::downgrade(&a.chunk);
        assert!(Arc::ptr_eq(&a.chunk, &b.chunk));
        drop(a);
        assert!(chunk.upgrade().is_some(), "b still uses the chunk");
        assert_eq!(b[999], 2.0);
        drop(b);
        assert!(chunk.upgrade().is_none(), "the chunk outlived its weights");
        assert!(arena.lock().is_none());
        // The next weight opens a new chunk.
        let c = arena.filled(10, |v| v.fill(3.0)).unwrap();
        assert_eq!(&c[..], &[3.0; 10]);
    }
}
