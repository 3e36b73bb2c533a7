mod common;
use persona::backend::wgpu::WgpuBackend;
use persona::engine::SeqInput;
use std::time::Instant;
#[test]
fn model_timing() {
    let b = WgpuBackend::new().unwrap();
    let t0 = Instant::now();
    let m = persona::LoadedModel::load(&common::default_model().unwrap(), b, 512).unwrap();
    eprintln!("load {:.2}", t0.elapsed().as_secs_f64());
    let ids: Vec<u32> = (1..38).collect();
    let e = &m.engine;
    let mut c = e.new_cache(1, 128).unwrap();
    let t0 = Instant::now();
    e.forward(&mut c, &[SeqInput { slot: 0, tokens: &ids, ..Default::default() }], false).unwrap();
    eprintln!("prefill 37 {:.2}", t0.elapsed().as_secs_f64());
    for i in 0..4 {
        let t0 = Instant::now();
        e.forward(&mut c, &[SeqInput { slot: 0, tokens: &[5], ..Default::default() }], false).unwrap();
        eprintln!("decode {i} {:.2}", t0.elapsed().as_secs_f64());
    }
}
