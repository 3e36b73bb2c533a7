//! A batch's per-token layout on the device.

use cudarc::driver::CudaSlice;

use super::PREFILL_Q;
use crate::backend::TokenPos;

/// A batch's layout on the device: `[t][2]` (slot, pos), the KV page table, and the prefill
/// attention tiles `[n][2]` (first token, count): runs of up to `PREFILL_Q` consecutive tokens of
/// one slot.
pub struct CudaLayout {
    pub(super) tokens: Vec<TokenPos>,
    pub(super) dev: CudaSlice<u32>,
    pub(super) pages: CudaSlice<u32>,
    pub(super) page_size: usize,
    pub(super) width: usize,
    /// Pages the table uses (the cache must have at least these).
    pub(super) pages_used: usize,
    pub(super) tiles: CudaSlice<u32>,
    pub(super) n_tiles: usize,
}

/// Runs of up to `PREFILL_Q` consecutive tokens of one slot, as (first, count).
pub(super) fn prefill_tiles(tokens: &[TokenPos]) -> Vec<u32> {
    let mut tiles = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let mut n = 1;
        while i + n < tokens.len() && n < PREFILL_Q && tokens[i + n].slot == tokens[i].slot {
            n += 1;
        }
        tiles.extend([i as u32, n as u32]);
        i += n;
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_tiles_split_runs_by_slot_and_size() {
        let tp = |slot, pos| TokenPos { slot, pos };
        let mut toks: Vec<TokenPos> = (0..20).map(|i| tp(0, i)).collect();
        toks.extend([tp(1, 5), tp(1, 6), tp(2, 0)]);
        assert_eq!(prefill_tiles(&toks), vec![0, 16, 16, 4, 20, 2, 22, 1]);
        assert!(prefill_tiles(&[]).is_empty());
    }
}
