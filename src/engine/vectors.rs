//! The device-resident vector table a KV cache keeps across forward calls: each steering or
//! probe vector is uploaded once (with its unit vector) when a call first needs it, and plans
//! index its rows, so a decode step uploads O(ops) plan words and no vector values.
//!
//! Vectors are known by allocation (the `Arc` a sequence's [`crate::steer::SeqSteering`] holds
//! for its whole life). The table keeps a clone of each, so an address cannot be reused while
//! its row is live; a row whose vector nobody else holds any more is free for the next vector.
//! When a call needs more rows than are free, the table doubles and is written again.

use std::collections::HashMap;
use std::sync::Arc;

use super::plan::unit;
use crate::backend::Backend;
use crate::error::Result;

pub struct VectorTable<B: Backend> {
    hidden: usize,
    dev: Option<B::Vectors>,
    /// The vector in each row (`None`: free).
    rows: Vec<Option<Arc<[f32]>>>,
    index: HashMap<*const f32, u32>,
    /// Rows written to the device so far (for tests and benchmarks).
    pub written: u64,
}

// The raw pointers are only keys into `rows`, whose `Arc`s own what they point to.
unsafe impl<B: Backend> Send for VectorTable<B> {}
unsafe impl<B: Backend> Sync for VectorTable<B> {}

fn key(v: &Arc<[f32]>) -> *const f32 {
    Arc::as_ptr(v) as *const f32
}

impl<B: Backend> VectorTable<B> {
    pub fn new(hidden: usize) -> Self {
        VectorTable { hidden, dev: None, rows: vec![], index: HashMap::new(), written: 0 }
    }

    /// Rows of the table on the device.
    pub fn capacity(&self) -> usize {
        self.rows.len()
    }

    /// The device table (after [`VectorTable::rows_for`]).
    pub fn device(&self) -> Option<&B::Vectors> {
        self.dev.as_ref()
    }

    /// The row of each of `vectors`, uploading those not in the table yet.
    pub fn rows_for(&mut self, b: &B, vectors: &[Arc<[f32]>]) -> Result<Vec<u32>> {
        if self.dev.is_none() {
            // Even a plan without vectors (captures only) runs against a table.
            self.grow(b, 0)?;
        }
        let mut missing: Vec<&Arc<[f32]>> = vectors.iter().filter(|v| !self.index.contains_key(&key(v))).collect();
        let mut seen = std::collections::HashSet::new();
        missing.retain(|v| seen.insert(key(v)));
        if !missing.is_empty() {
            // Rows held only by the table (and not asked for now: those have more holders).
            for r in 0..self.rows.len() {
                if self.rows[r].as_ref().is_some_and(|v| Arc::strong_count(v) == 1) {
                    let v = self.rows[r].take().expect("checked above");
                    self.index.remove(&key(&v));
                }
            }
            let free = self.rows.iter().filter(|r| r.is_none()).count();
            if free < missing.len() {
                self.grow(b, self.rows.len() - free + missing.len())?;
            }
            for v in missing {
                let r = self.rows.iter().position(|r| r.is_none()).expect("room made above");
                b.write_vectors(self.dev.as_mut().expect("allocated by grow"), r, v, &unit(v))?;
                self.written += 1;
                self.rows[r] = Some(v.clone());
                self.index.insert(key(v), r as u32);
            }
        }
        Ok(vectors.iter().map(|v| self.index[&key(v)]).collect())
    }

    /// A new device table with room for at least `live` rows (doubling), holding the live rows.
    /// On an error the table is left as it was.
    fn grow(&mut self, b: &B, live: usize) -> Result<()> {
        let cap = live.max(2 * self.rows.len()).max(8);
        let mut dev = b.vectors(cap, self.hidden)?;
        let kept: Vec<Arc<[f32]>> = self.rows.iter().flatten().cloned().collect();
        if !kept.is_empty() {
            let raw: Vec<f32> = kept.iter().flat_map(|v| v.iter().copied()).collect();
            let units: Vec<f32> = kept.iter().flat_map(|v| unit(v)).collect();
            b.write_vectors(&mut dev, 0, &raw, &units)?;
        }
        self.written += kept.len() as u64;
        self.index = kept.iter().enumerate().map(|(r, v)| (key(v), r as u32)).collect();
        self.rows = kept.into_iter().map(Some).collect();
        self.rows.resize(cap, None);
        self.dev = Some(dev);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    fn v(x: f32) -> Arc<[f32]> {
        vec![x, 1.0, 0.0, 2.0].into()
    }

    #[test]
    fn vectors_are_uploaded_once_and_rows_are_reused() {
        let b = CpuBackend;
        let mut t = VectorTable::<CpuBackend>::new(4);
        let (a, c) = (v(1.0), v(3.0));
        let rows = t.rows_for(&b, &[a.clone(), c.clone()]).unwrap();
        assert_eq!(t.written, 2);
        assert_eq!(t.capacity(), 8);
        // The same allocations again: nothing written.
        assert_eq!(t.rows_for(&b, &[c.clone(), a.clone()]).unwrap(), vec![rows[1], rows[0]]);
        assert_eq!(t.written, 2);
        let dev = t.device().unwrap();
        assert_eq!(dev.vector(rows[1]), &[3.0, 1.0, 0.0, 2.0]);
        let u = dev.unit(rows[0]);
        assert!((u.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6);
        // An equal vector in another allocation is another row.
        let a2 = v(1.0);
        let r2 = t.rows_for(&b, &[a2.clone()]).unwrap()[0];
        assert!(!rows.contains(&r2));
        // Rows whose vector is gone take new vectors without growth: 3 of 8 rows are live.
        let five: Vec<Arc<[f32]>> = (0..5).map(|i| v(i as f32 + 50.0)).collect();
        let r5 = t.rows_for(&b, &five).unwrap();
        assert_eq!((t.capacity(), t.written), (8, 8));
        drop(five);
        let again: Vec<Arc<[f32]>> = (0..5).map(|i| v(i as f32 + 70.0)).collect();
        let ra = t.rows_for(&b, &again).unwrap();
        assert_eq!((t.capacity(), t.written), (8, 13), "freed rows reused, nothing rewritten");
        let (mut x, mut y) = (r5.clone(), ra.clone());
        x.sort();
        y.sort();
        assert_eq!(x, y);
        for (r, m) in ra.iter().zip(&again) {
            assert_eq!(t.device().unwrap().vector(*r), &m[..]);
        }
        // The same allocation twice in one call is one row.
        let twice = t.rows_for(&b, &[again[0].clone(), again[0].clone()]).unwrap();
        assert_eq!((twice[0], twice[1], t.written), (ra[0], ra[0], 13));
        drop(again);
        // Dropped vectors free their rows; 9 new ones still need a larger table.
        drop((a, c, a2));
        let many: Vec<Arc<[f32]>> = (0..9).map(|i| v(i as f32 + 10.0)).collect();
        let rows = t.rows_for(&b, &many).unwrap();
        assert_eq!(t.capacity(), 16);
        let dev = t.device().unwrap();
        for (r, m) in rows.iter().zip(&many) {
            assert_eq!(dev.vector(*r), &m[..]);
        }
        // Live rows survive growth with their values.
        let more: Vec<Arc<[f32]>> = (0..10).map(|i| v(i as f32 + 30.0)).collect();
        let all: Vec<Arc<[f32]>> = many.iter().chain(&more).cloned().collect();
        let rows = t.rows_for(&b, &all).unwrap();
        assert_eq!(t.capacity(), 32);
        let dev = t.device().unwrap();
        for (r, m) in rows.iter().zip(&all) {
            assert_eq!(dev.vector(*r), &m[..]);
        }
    }
}
