//! The CUDA backend: hand-written kernels (kernels/*.cu) compiled by NVRTC for the device's
//! architecture on first use, launched through cudarc's driver API on one stream.
//!
//! Memory: weights live on the GPU as bf16 (f16 kept as f16; f32 host tensors -- e.g. GGUF
//! blocks dequantized by the loader -- rounded to bf16). 1-D tensors (norm weights, biases) and
//! the engine's RoPE table stay f32: they are tiny, and the kernels read them in f32. The
//! residual stream, activations and KV cache are f32. Within a forward step the only host
//! transfers are those the trait implies: ids, rows, the layout and the plan go up, logits and
//! plan outputs come down.
//!
//! ```no_run
//! use persona::backend::cuda::CudaBackend;
//! let b = CudaBackend::new(0)?; // a clear error when there is no driver, GPU or NVRTC
//! println!("{} ({})", b.device_name(), b.arch());
//! # Ok::<(), persona::Error>(())
//! ```

pub mod compile;
mod layout;
pub mod libs;
mod plan;
mod weights;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute_enum as Attr;
use cudarc::driver::sys::CUfunction_attribute_enum as FnAttr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::{AttnShape, Backend, KvLayer, PageTable, PlanOutputs, ResidualPlan, TokenPos};
use crate::error::Result;
use crate::model::tensor::{DType, HostTensor};
use layout::prefill_tiles;
pub use layout::CudaLayout;
use libs::err;
pub use plan::{CudaPlan, CudaVectors};
pub use weights::CudaWeight;
use weights::WeightData;

/// Decode path of the matmul (GEMV) up to this many tokens; tiled tensor-core GEMM above.
const GEMV_MAX_T: usize = 8;
/// Largest head size the attention kernels hold in registers (`MAX_HEAD_DIM` in attention.cu).
const MAX_HEAD_DIM: usize = 256;
/// Query tile and key block of the prefill attention kernel (`PREFILL_Q`, `PREFILL_K`).
const PREFILL_Q: usize = 16;
const PREFILL_K: usize = 32;
/// Memory left free when uploading weights, for activations, the KV cache and the driver.
const WEIGHT_RESERVE: usize = 256 << 20;

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    device: String,
    smem_optin: usize,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// Ids / rows uploaded for embed and gather_rows (stream-ordered reuse).
    index_scratch: Mutex<CudaSlice<u32>>,
    plans: plan::Pool,
}

fn drv(what: impl std::fmt::Display) -> impl FnOnce(DriverError) -> crate::Error {
    move |e| {
        if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            err(format!("{what}: out of GPU memory"))
        } else {
            err(format!("{what}: {e}"))
        }
    }
}

/// One kernel argument.
enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem as u32 }
}

fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per)).map_err(|_| err(format!("{n} elements exceed a launch grid")))
}

fn mib(b: usize) -> usize {
    b >> 20
}

impl CudaBackend {
    /// Whether a CUDA device can be used (driver, GPU of compute capability 8.0+, NVRTC and its
    /// headers); the error says why not.
    pub fn probe() -> Result<()> {
        Self::new(0).map(|_| ())
    }

    /// Open device `ordinal`. Checks for the driver, NVRTC and its headers first (cudarc panics
    /// on a missing library), and that NVRTC can compile for the device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !libs::driver_present() {
            return Err(err("no NVIDIA driver (libcuda.so) found"));
        }
        let nv = libs::nvrtc()?;
        let count = CudaContext::device_count().map_err(drv("initialising the NVIDIA driver"))?;
        if ordinal >= count.max(0) as usize {
            return Err(err(format!("no CUDA device {ordinal} ({count} found)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv(format!("opening CUDA device {ordinal}")))?;
        // One stream, and every buffer outlives its launches (freed stream-ordered), so
        // cudarc's per-buffer event tracking is not needed.
        // SAFETY: called before any buffer is created; all work goes to one stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(drv("reading the compute capability"))?;
        let device = ctx.name().unwrap_or_else(|_| format!("CUDA device {ordinal}"));
        if major < 8 {
            return Err(err(format!(
                "{device} has compute capability {major}.{minor}; the kernels need 8.0+ (bf16 tensor cores)"
            )));
        }
        let sm = major * 10 + minor;
        let supported = libs::supported_archs()?;
        if !supported.contains(&sm) {
            return Err(err(format!(
                "NVRTC {}.{} cannot compile for {device} (sm_{sm}); it supports {}",
                nv.version.0,
                nv.version.1,
                supported.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let smem_optin =
            ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).unwrap_or(48 * 1024) as usize;
        let stream = ctx.default_stream();
        let index_scratch = stream.alloc_zeros::<u32>(1024).map_err(drv("allocating scratch"))?;
        Ok(CudaBackend {
            ctx,
            stream,
            arch: format!("sm_{sm}"),
            device,
            smem_optin,
            functions: Mutex::new(HashMap::new()),
            index_scratch: Mutex::new(index_scratch),
            plans: Arc::new(Mutex::new(None)),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// The architecture the kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Compile (or load from the disk cache) every kernel file now, instead of on first use.
    pub fn warm_up(&self) -> Result<()> {
        for f in compile::FILES {
            self.function(f.name, f.entries[0])?;
        }
        Ok(())
    }

    /// Wait for all queued work (surfaces asynchronous kernel errors).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("running CUDA kernels"))
    }

    fn function(&self, file: &'static str, entry: &'static str) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fns.get(entry) {
            return Ok(f.clone());
        }
        let kf = compile::file(file).ok_or_else(|| err(format!("no kernel file {file}")))?;
        let cubin = compile::cubin(kf, &self.arch)?;
        let module =
            self.ctx.load_module(Ptx::from_binary(cubin)).map_err(drv(format!("loading kernels/{file}.cu")))?;
        for e in kf.entries {
            let f = module.load_function(e).map_err(drv(format!("finding `{e}` in kernels/{file}.cu")))?;
            fns.insert(e, f);
        }
        fns.get(entry).cloned().ok_or_else(|| err(format!("kernels/{file}.cu has no entry `{entry}`")))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn launch(&self, file: &'static str, entry: &'static str, c: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.function(file, entry)?;
        if c.shared_mem_bytes as usize > 48 * 1024 {
            if c.shared_mem_bytes as usize > self.smem_optin {
                return Err(err(format!(
                    "{entry} needs {} bytes of shared memory; {} allows {}",
                    c.shared_mem_bytes, self.device, self.smem_optin
                )));
            }
            f.set_attribute(FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, c.shared_mem_bytes as i32)
                .map_err(drv(format!("raising the shared memory of {entry}")))?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: argument lists match the kernels' signatures (pointer, int, float, u64), every
        // pointer is a live device allocation whose extent the caller checked.
        unsafe { b.launch(c) }.map_err(drv(format!("launching {entry}")))?;
        Ok(())
    }

    fn ensure_free(&self, bytes: usize, reserve: usize, what: &str) -> Result<()> {
        let (free, total) = self.ctx.mem_get_info().map_err(drv("reading free GPU memory"))?;
        if bytes.saturating_add(reserve) > free {
            return Err(err(format!(
                "{what} needs {} MiB but {} has {} MiB free of {} MiB: the model does not fit on this GPU \
                 (use a smaller model or context, or --backend cpu)",
                mib(bytes).max(1),
                self.device,
                mib(free),
                mib(total)
            )));
        }
        Ok(())
    }

    /// Upload `data` into the index scratch buffer and run `f` with its pointer.
    fn with_indices(&self, data: &[u32], f: impl FnOnce(u64) -> Result<()>) -> Result<()> {
        let mut s = self.index_scratch.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < data.len() {
            *s = self.stream.alloc_zeros::<u32>(data.len().next_power_of_two()).map_err(drv("allocating scratch"))?;
        }
        if !data.is_empty() {
            let mut dst = s.slice_mut(..data.len());
            self.stream.memcpy_htod(data, &mut dst).map_err(drv("uploading indices"))?;
        }
        f(self.ptr(&s))
    }

    fn f32_weight<'a>(&self, w: &'a CudaWeight, what: &str, min_len: usize) -> Result<&'a CudaSlice<f32>> {
        match &w.data {
            WeightData::F32(s) if s.len() >= min_len => Ok(s),
            WeightData::F32(s) => Err(err(format!("{what} `{}` has {} values, needs {min_len}", w.name, s.len()))),
            _ => Err(err(format!("{what} `{}` is {}; the kernel reads f32", w.name, w.dtype_name()))),
        }
    }
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(err(format!("{what} holds {have} values, the call needs {need}")));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Weight = CudaWeight;
    type Layout = CudaLayout;
    type Plan = CudaPlan;
    type Vectors = CudaVectors;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaWeight> {
        // Quantized blocks are widened here, one tensor at a time, and stored as bf16.
        let t = &*t.widened();
        let n = t.numel();
        let keep_f32 = t.shape.len() <= 1;
        let what = format!("tensor `{}` {:?}", t.name, t.shape);
        let up = |bytes: usize| self.ensure_free(bytes, WEIGHT_RESERVE, &what);
        let data = if keep_f32 {
            up(n * 4)?;
            WeightData::F32(self.stream.clone_htod(&t.to_f32()).map_err(drv(format!("uploading {what}")))?)
        } else {
            up(n * 2)?;
            let bits: Vec<u16> = match t.dtype() {
                DType::BF16 | DType::F16 => {
                    t.bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
                }
                DType::F32 => t.to_f32().into_iter().map(|v| half::bf16::from_f32(v).to_bits()).collect(),
            };
            if bits.len() != n {
                return Err(err(format!("{what}: {} values stored, shape has {n}", bits.len())));
            }
            let s = self.stream.clone_htod(&bits).map_err(drv(format!("uploading {what}")))?;
            if t.dtype() == DType::F16 {
                WeightData::F16(s)
            } else {
                WeightData::Bf16(s)
            }
        };
        Ok(CudaWeight { data, shape: t.shape.clone(), name: t.name.clone() })
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.ensure_free(len * 4, 0, &format!("a buffer of {len} values"))?;
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(drv(format!("allocating {len} values")))
    }

    fn write(&self, dst: &mut CudaSlice<f32>, src: &[f32]) -> Result<()> {
        if src.len() > dst.len() {
            return Err(err(format!("write of {} values into a buffer of {}", src.len(), dst.len())));
        }
        if src.is_empty() {
            return Ok(());
        }
        let mut d = dst.slice_mut(..src.len());
        self.stream.memcpy_htod(src, &mut d).map_err(drv("writing a buffer"))
    }

    fn read(&self, src: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        if len > src.len() {
            return Err(err(format!("read of {len} values from {}", src.len())));
        }
        if len == 0 {
            return Ok(vec![]);
        }
        let v = self.stream.clone_dtoh(&src.slice(..len)).map_err(drv("reading a buffer"))?;
        self.synchronize()?;
        Ok(v)
    }

    fn layout(&self, tokens: &[TokenPos], pages: &PageTable) -> Result<CudaLayout> {
        let pages_used = pages.check(tokens)?;
        let flat: Vec<u32> = tokens.iter().flat_map(|t| [t.slot, t.pos]).collect();
        let tiles = prefill_tiles(tokens);
        let up = |v: &[u32]| -> Result<CudaSlice<u32>> {
            if v.is_empty() {
                return self.stream.alloc_zeros::<u32>(1).map_err(drv("allocating a layout"));
            }
            self.stream.clone_htod(v).map_err(drv("uploading a layout"))
        };
        Ok(CudaLayout {
            tokens: tokens.to_vec(),
            dev: up(&flat)?,
            pages: up(&pages.table)?,
            page_size: pages.page_size,
            width: pages.width,
            pages_used,
            tiles: up(&tiles)?,
            n_tiles: tiles.len() / 2,
        })
    }

    fn vectors(&self, rows: usize, hidden: usize) -> Result<CudaVectors> {
        plan::vectors(&self.stream, rows, hidden)
    }

    fn write_vectors(&self, table: &mut CudaVectors, row: usize, raw: &[f32], units: &[f32]) -> Result<()> {
        plan::write_vectors(&self.stream, table, row, raw, units)
    }

    fn plan(&self, p: &ResidualPlan) -> Result<CudaPlan> {
        plan::upload(&self.stream, &self.plans, p)
    }

    fn plan_outputs(&self, p: &CudaPlan) -> Result<PlanOutputs> {
        let b = p.bufs();
        let proj = self.read(&b.proj.buf, p.proj_len)?;
        let capture = self.read(&b.capture.buf, p.capture_len)?;
        let counts = if p.counts_len == 0 {
            vec![]
        } else {
            let c = self
                .stream
                .clone_dtoh(&b.counts.buf.slice(..p.counts_len))
                .map_err(drv("reading the plan's op counts"))?;
            self.synchronize()?;
            c
        };
        Ok(PlanOutputs { proj, capture, counts })
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], width: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        if width == 0 || table.numel() % width != 0 {
            return Err(err(format!("embedding table `{}` {:?} is not [rows, {width}]", table.name, table.shape)));
        }
        let rows = table.numel() / width;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(err(format!("token id {id} is outside the embedding table ({rows} rows)")));
        }
        check_len("the embedding output", out.len(), ids.len() * width)?;
        if ids.is_empty() {
            return Ok(());
        }
        let (entry, tp) = match &table.data {
            WeightData::Bf16(s) => ("embed_bf16", self.ptr(s)),
            WeightData::F16(s) => ("embed_f16", self.ptr(s)),
            WeightData::F32(s) => ("embed_f32", self.ptr(s)),
        };
        let op = self.ptr(out);
        self.with_indices(ids, |ip| {
            let c = cfg((ids.len() as u32, 1, 1), 256, 0);
            self.launch("embed", entry, c, &[Arg::Ptr(tp), Arg::Ptr(ip), Arg::Ptr(op), Arg::I32(width as i32)])
        })
    }

    fn residual_steer_norm(
        &self,
        h: &mut CudaSlice<f32>,
        delta: Option<&CudaSlice<f32>>,
        steer: Option<(&mut CudaPlan, &CudaVectors, usize)>,
        norm: &CudaWeight,
        eps: f32,
        t: usize,
        width: usize,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = t * width;
        check_len("h", h.len(), n)?;
        check_len("x", x.len(), n)?;
        if let Some(d) = delta {
            check_len("delta", d.len(), n)?;
        }
        let w = self.f32_weight(norm, "norm weight", width)?;
        if t == 0 || width == 0 {
            return Ok(());
        }
        let smem = width * 4;
        if smem > self.smem_optin {
            return Err(err(format!("hidden size {width} does not fit in the shared memory of {}", self.device)));
        }
        let mut args = vec![
            Arg::Ptr(self.ptr(h)),
            Arg::Ptr(delta.map(|d| self.ptr(d)).unwrap_or(0)),
            Arg::Ptr(self.ptr(w)),
            Arg::Ptr(self.ptr(x)),
            Arg::I32(width as i32),
            Arg::F32(eps),
        ];
        match &steer {
            Some((p, vt, l)) => {
                if p.t < t || *l > p.n_layers || p.hidden != width || vt.rows < p.n_vectors || vt.hidden != width {
                    return Err(err(format!(
                        "residual plan (t {}, {} vectors) does not fit this call (t {t}, layer {l}, width {width}) and \
                         its vector table ({} × {})",
                        p.t, p.n_vectors, vt.rows, vt.hidden
                    )));
                }
                let b = p.bufs();
                args.extend([Arg::I32(*l as i32), Arg::I32(p.n_layers as i32), Arg::I32(p.n_seqs as i32)]);
                for s in [&vt.raw, &vt.units] {
                    args.push(Arg::Ptr(self.ptr(s)));
                }
                for s in [
                    &b.token_seq.buf,
                    &b.token_flags.buf,
                    &b.token_capture.buf,
                    &b.token_proj.buf,
                    &b.ops.buf,
                    &b.op_ranges.buf,
                ] {
                    args.push(Arg::Ptr(self.ptr(s)));
                }
                for s in [&b.probes.buf, &b.probe_ranges.buf] {
                    args.push(Arg::Ptr(self.ptr(s)));
                }
                args.extend([
                    Arg::Ptr(self.ptr(&b.proj.buf)),
                    Arg::Ptr(self.ptr(&b.capture.buf)),
                    Arg::Ptr(self.ptr(&b.counts.buf)),
                ]);
            }
            None => {
                args.extend([Arg::I32(0), Arg::I32(0), Arg::I32(0)]);
                args.extend((0..13).map(|_| Arg::Ptr(0)));
            }
        }
        let threads = width.div_ceil(32).clamp(1, 8) as u32 * 32;
        self.launch("residual_steer_norm", "residual_steer_norm_f32", cfg((t as u32, 1, 1), threads, smem), &args)
    }

    fn matmul(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        t: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if w.shape.len() != 2 {
            return Err(err(format!("matmul weight `{}` {:?} is not a matrix", w.name, w.shape)));
        }
        let (n, k) = (w.shape[0], w.shape[1]);
        check_len("matmul input", x.len(), t * k)?;
        check_len("matmul output", out.len(), t * n)?;
        let bp = match bias {
            Some(b) => self.ptr(self.f32_weight(b, "bias", n)?),
            None => 0,
        };
        let (dtype, wp) = match &w.data {
            WeightData::Bf16(s) => ("bf16", self.ptr(s)),
            WeightData::F16(s) => ("f16", self.ptr(s)),
            WeightData::F32(_) => {
                return Err(err(format!("matmul weight `{}` is f32; the CUDA backend stores matrices as bf16", w.name)))
            }
        };
        if t == 0 || n == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(self.ptr(x)),
            Arg::Ptr(wp),
            Arg::Ptr(bp),
            Arg::Ptr(self.ptr(out)),
            Arg::I32(t as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
        ];
        let gemv = t <= GEMV_MAX_T;
        let entry = match (gemv, dtype) {
            (true, "bf16") => "matmul_gemv_bf16",
            (true, _) => "matmul_gemv_f16",
            (false, "bf16") => "matmul_gemm_bf16",
            (false, _) => "matmul_gemm_f16",
        };
        let c =
            if gemv { cfg((blocks(n, 8)?, 1, 1), 256, 0) } else { cfg((blocks(n, 64)?, blocks(t, 64)?, 1), 128, 0) };
        self.launch("matmul", entry, c, &args)
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos_sin: &CudaSlice<f32>,
        layout: &CudaLayout,
        t: usize,
        heads: usize,
        hd: usize,
    ) -> Result<()> {
        if hd == 0 || hd % 2 != 0 {
            return Err(err(format!("RoPE needs an even head size, got {hd}")));
        }
        let table = cos_sin;
        let max_pos = table.len() / hd;
        check_len("the layout", layout.tokens.len(), t)?;
        check_len("RoPE input", x.len(), t * heads * hd)?;
        if let Some(tp) = layout.tokens[..t].iter().find(|tp| tp.pos as usize >= max_pos) {
            return Err(err(format!("position {} is beyond the RoPE table ({max_pos})", tp.pos)));
        }
        let n = t * heads * hd / 2;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(self.ptr(x)),
            Arg::Ptr(self.ptr(table)),
            Arg::Ptr(self.ptr(&layout.dev)),
            Arg::I32(t as i32),
            Arg::I32(heads as i32),
            Arg::I32(hd as i32),
        ];
        self.launch("rope", "rope_f32", cfg((blocks(n, 256)?, 1, 1), 256, 0), &args)
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut KvLayer<Self>,
        layout: &CudaLayout,
        t: usize,
        s: AttnShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let hd = s.head_dim;
        if hd == 0 || hd > MAX_HEAD_DIM || s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
            return Err(err(format!(
                "attention shape {} heads / {} kv heads of size {hd} is not supported (GQA needs a whole \
                 ratio; head size 1..={MAX_HEAD_DIM})",
                s.n_heads, s.n_kv_heads
            )));
        }
        if layout.tokens.len() != t {
            return Err(err(format!("the layout has {} tokens, the call {t}", layout.tokens.len())));
        }
        let kvw = s.n_kv_heads * hd;
        check_len("q", q.len(), t * s.n_heads * hd)?;
        check_len("k", k.len(), t * kvw)?;
        check_len("v", v.len(), t * kvw)?;
        check_len("attention output", out.len(), t * s.n_heads * hd)?;
        let pages = cache.k.len().min(cache.v.len()) / (layout.page_size * kvw).max(1);
        if layout.pages_used > pages {
            return Err(err(format!("the layout uses {} KV pages; the cache has {pages}", layout.pages_used)));
        }
        if t == 0 {
            return Ok(());
        }
        let (kc, vc, lp, pp) = (self.ptr(&cache.k), self.ptr(&cache.v), self.ptr(&layout.dev), self.ptr(&layout.pages));
        let store = [
            Arg::Ptr(self.ptr(k)),
            Arg::Ptr(self.ptr(v)),
            Arg::Ptr(kc),
            Arg::Ptr(vc),
            Arg::Ptr(lp),
            Arg::Ptr(pp),
            Arg::I32(t as i32),
            Arg::I32(kvw as i32),
            Arg::I32(layout.page_size as i32),
            Arg::I32(layout.width as i32),
        ];
        self.launch("attention", "attention_store_f32", cfg((blocks(t * kvw, 256)?, 1, 1), 256, 0), &store)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let (qp, op) = (self.ptr(q), self.ptr(out));
        let shape = [
            Arg::Ptr(pp),
            Arg::I32(s.n_heads as i32),
            Arg::I32(s.n_kv_heads as i32),
            Arg::I32(hd as i32),
            Arg::I32(layout.page_size as i32),
            Arg::I32(layout.width as i32),
            Arg::F32(scale),
        ];
        // About one new token per sequence (decode): a block per (token, head) splitting the
        // positions among its warps; otherwise query tiles sharing staged keys and values.
        if layout.n_tiles * 2 > t {
            let mut args = vec![Arg::Ptr(qp), Arg::Ptr(kc), Arg::Ptr(vc), Arg::Ptr(lp), Arg::Ptr(op)];
            args.extend(shape);
            self.launch("attention", "attention_decode_f32", cfg((s.n_heads as u32, t as u32, 1), 128, 0), &args)
        } else {
            let smem = (PREFILL_Q * hd + PREFILL_K * (hd + 1) + PREFILL_K * hd) * 4;
            let mut args = vec![
                Arg::Ptr(qp),
                Arg::Ptr(kc),
                Arg::Ptr(vc),
                Arg::Ptr(lp),
                Arg::Ptr(self.ptr(&layout.tiles)),
                Arg::Ptr(op),
            ];
            args.extend(shape);
            let c = cfg((layout.n_tiles as u32, s.n_heads as u32, 1), 128, smem);
            self.launch("attention", "attention_prefill_f32", c, &args)
        }
    }

    fn silu_mul(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, n: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        check_len("gate", gate.len(), n)?;
        check_len("up", up.len(), n)?;
        check_len("silu_mul output", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let args = [Arg::Ptr(self.ptr(gate)), Arg::Ptr(self.ptr(up)), Arg::Ptr(self.ptr(out)), Arg::U64(n as u64)];
        self.launch("silu_mul", "silu_mul_f32", cfg((blocks(n, 256)?, 1, 1), 256, 0), &args)
    }

    fn gather_rows(&self, x: &CudaSlice<f32>, rows: &[u32], width: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        let have = x.len() / width.max(1);
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= have) {
            return Err(err(format!("row {r} is outside the buffer ({have} rows of {width})")));
        }
        check_len("gather output", out.len(), rows.len() * width)?;
        if rows.is_empty() || width == 0 {
            return Ok(());
        }
        let (xp, op) = (self.ptr(x), self.ptr(out));
        self.with_indices(rows, |rp| {
            let c = cfg((rows.len() as u32, 1, 1), 256, 0);
            self.launch(
                "gather_rows",
                "gather_rows_f32",
                c,
                &[Arg::Ptr(xp), Arg::Ptr(rp), Arg::Ptr(op), Arg::I32(width as i32)],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver (as on CI), opening the backend is a clear error, never a panic.
    #[test]
    fn new_without_a_gpu_is_an_error_not_a_panic() {
        if libs::driver_present() {
            return;
        }
        let e = CudaBackend::new(0).err().expect("no driver here").to_string();
        assert!(e.contains("libcuda"), "{e}");
    }
}
