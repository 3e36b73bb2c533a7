mod common;
use common::*;
use persona::backend::cpu::{CpuBackend, CpuPlan, CpuWeight};
use persona::backend::*;
use persona::engine::{Engine, SeqInput};
use persona::engine::generate::GenRequest;
use persona::model::tensor::HostTensor;
use persona::model::ModelFiles;

struct B16;
fn r(v: f32) -> f32 { half::bf16::from_f32(v).to_f32() }
impl Backend for B16 {
    type Buf = Vec<f32>; type Weight = CpuWeight; type Layout = Vec<TokenPos>; type Plan = CpuPlan;
    fn name(&self) -> &'static str { "b16" }
    fn upload(&self, t: &HostTensor) -> persona::Result<CpuWeight> {
        let mut w = CpuBackend.upload(t)?;
        if t.shape.len() == 2 && t.name != "rope.cos_sin" { w.data = std::sync::Arc::new(w.data.iter().map(|&v| r(v)).collect()); }
        Ok(w)
    }
    fn alloc(&self, n: usize) -> persona::Result<Vec<f32>> { CpuBackend.alloc(n) }
    fn write(&self, d: &mut Vec<f32>, s: &[f32]) -> persona::Result<()> { CpuBackend.write(d, s) }
    fn read(&self, s: &Vec<f32>, n: usize) -> persona::Result<Vec<f32>> { CpuBackend.read(s, n) }
    fn layout(&self, t: &[TokenPos]) -> persona::Result<Vec<TokenPos>> { CpuBackend.layout(t) }
    fn plan(&self, p: &ResidualPlan) -> persona::Result<CpuPlan> { CpuBackend.plan(p) }
    fn plan_outputs(&self, p: &CpuPlan) -> persona::Result<(Vec<f32>, Vec<f32>)> { CpuBackend.plan_outputs(p) }
    fn embed(&self, t: &CpuWeight, ids: &[u32], w: usize, o: &mut Vec<f32>) -> persona::Result<()> { CpuBackend.embed(t, ids, w, o) }
    fn residual_steer_norm(&self, h: &mut Vec<f32>, d: Option<&Vec<f32>>, s: Option<(&mut CpuPlan, usize)>, n: &CpuWeight, eps: f32, t: usize, w: usize, x: &mut Vec<f32>) -> persona::Result<()> { CpuBackend.residual_steer_norm(h, d, s, n, eps, t, w, x) }
    fn matmul(&self, x: &Vec<f32>, w: &CpuWeight, b: Option<&CpuWeight>, t: usize, o: &mut Vec<f32>) -> persona::Result<()> {
        if t > 8 { let xr: Vec<f32> = x.iter().map(|&v| r(v)).collect(); CpuBackend.matmul(&xr, w, b, t, o) } else { CpuBackend.matmul(x, w, b, t, o) }
    }
    fn rope(&self, x: &mut Vec<f32>, c: &CpuWeight, l: &Vec<TokenPos>, t: usize, h: usize, hd: usize) -> persona::Result<()> { CpuBackend.rope(x, c, l, t, h, hd) }
    fn attention(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, c: &mut KvLayer<Self>, l: &Vec<TokenPos>, t: usize, s: AttnShape, o: &mut Vec<f32>) -> persona::Result<()> {
        let mut cc = KvLayer::<CpuBackend> { k: std::mem::take(&mut c.k), v: std::mem::take(&mut c.v) };
        let r = CpuBackend.attention(q, k, v, &mut cc, l, t, s, o); c.k = cc.k; c.v = cc.v; r
    }
    fn silu_mul(&self, g: &Vec<f32>, u: &Vec<f32>, n: usize, o: &mut Vec<f32>) -> persona::Result<()> { CpuBackend.silu_mul(g, u, n, o) }
    fn gather_rows(&self, x: &Vec<f32>, r: &[u32], w: usize, o: &mut Vec<f32>) -> persona::Result<()> { CpuBackend.gather_rows(x, r, w, o) }
}

#[test]
fn est() {
    for name in ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2"] {
        let dir = fixtures().join(name);
        let f = ModelFiles::open(&dir).unwrap();
        let e = Engine::new(B16, f.config.clone(), &f.tensors, 256).unwrap();
        let r = json(&dir.join("reference.json"));
        let ids = u32s(&r["ids"]);
        let mut c = e.new_cache(1, ids.len()).unwrap();
        let out = e.forward(&mut c, &[SeqInput { slot: 0, tokens: &ids, logits_from: Some(0), ..Default::default() }], true).unwrap();
        let mut worst = 0f32;
        for (t, row) in r["logits"].as_array().unwrap().iter().enumerate() {
            let want = f32s(row);
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            let e = out.row(t).iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
            worst = worst.max(e);
        }
        let want = u32s(&r["greedy_16_no_eos"]);
        let margins = f32s(&r["greedy_16_margins"]);
        let mut req = GenRequest::greedy(ids.clone(), want.len()); req.ignore_eos = true;
        let got = e.generate(&[req], &mut |_, _| {}).unwrap().remove(0).ids();
        eprintln!("{name}: worst rel {worst:.3e}; margins {:?}\n got {:?}\nwant {:?}", &margins, got, want);
    }
}
