//! The device, its queue, and what every op shares: buffers, the pipeline and bind-group caches,
//! the per-dispatch parameter arena, batched submission, read-back and error capture.
//!
//! Submission: dispatches are recorded into one pending command encoder and submitted together
//! (when the host needs data back, before a host write, or every `FLUSH_EVERY` dispatches), so a
//! decode step costs a few submits, not one per op. Small per-dispatch parameters go into a 64
//! KiB uniform arena, one 256-byte slot per dispatch, bound with a dynamic offset; the arena's
//! host copy is written with `queue.write_buffer` at submit time, which the queue orders before
//! that submit's command buffers. Per-call data whose size varies (token ids, layouts, plans)
//! gets its own buffer, initialised at creation, so nothing already recorded can see it change.
//!
//! Errors: wgpu reports validation and out-of-memory errors to a callback rather than returning
//! them (and panics without one). The callback stores them; every op checks the store and turns
//! what it finds into `Error::Backend { backend: "wgpu", .. }`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};

pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::Backend { backend: "wgpu", msg: msg.into() }
}

/// How a shader binding is accessed (binding 0 is always the parameter slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    ReadWrite,
}

/// One compute entry point: its WGSL file, name and storage bindings.
pub(crate) struct Kernel {
    pub file: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [(u32, Access)],
}

/// Weight-loading helpers shared by the shaders that read weights (`W_FORMAT`, `w_load`).
const COMMON: &str = include_str!("../../../shaders/common.wgsl");

/// The shader sources, by file name (mirroring `kernels/` name for name), each ready to compile:
/// common.wgsl is prepended to those that call `w_load` (WGSL has no #include).
pub fn shader_sources() -> Vec<(&'static str, String)> {
    [
        ("embed.wgsl", include_str!("../../../shaders/embed.wgsl")),
        ("residual_steer_norm.wgsl", include_str!("../../../shaders/residual_steer_norm.wgsl")),
        ("matmul.wgsl", include_str!("../../../shaders/matmul.wgsl")),
        ("rope.wgsl", include_str!("../../../shaders/rope.wgsl")),
        ("attention.wgsl", include_str!("../../../shaders/attention.wgsl")),
        ("silu_mul.wgsl", include_str!("../../../shaders/silu_mul.wgsl")),
        ("gather_rows.wgsl", include_str!("../../../shaders/gather_rows.wgsl")),
    ]
    .into_iter()
    .map(|(n, s)| (n, if s.contains("w_load") { format!("{COMMON}\n{s}") } else { s.to_string() }))
    .collect()
}

/// A device buffer with an id for the bind-group cache. Dropping it evicts the bind groups
/// that use it (they would otherwise keep its memory alive).
pub(crate) struct Gbuf {
    pub buf: wgpu::Buffer,
    pub id: u64,
    ctx: Arc<Ctx>,
}

impl Gbuf {
    pub fn bytes(&self) -> u64 {
        self.buf.size()
    }
}

impl Drop for Gbuf {
    fn drop(&mut self) {
        if let Ok(mut cache) = self.ctx.bind_groups.lock() {
            cache.retain(|k, _| !k.1.contains(&self.id));
        }
    }
}

type PipeKey = (&'static str, &'static str, u32);

struct Pipe {
    index: usize,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Bytes per parameter slot (≥ every adapter's min_uniform_buffer_offset_alignment, which
/// WebGPU caps at 256).
const SLOT: usize = 256;
const SLOTS: usize = 256;
/// Submit after this many recorded dispatches, so the GPU starts while the host records more.
const FLUSH_EVERY: usize = 128;

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    params: Vec<u8>,
    slots: usize,
    dispatches: usize,
}

pub(crate) struct Ctx {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Largest storage binding (and so weight chunk) in bytes.
    pub max_binding: u64,
    /// f16 weights can be unpacked in shaders (downlevel flag SHADER_F16_IN_F32).
    pub f16: bool,
    errors: Arc<Mutex<Vec<String>>>,
    pending: Mutex<Pending>,
    params: wgpu::Buffer,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    /// By (file, entry point, weight format).
    pipelines: Mutex<HashMap<PipeKey, Arc<Pipe>>>,
    /// By (pipeline, ids of the bound buffers).
    bind_groups: Mutex<HashMap<(usize, Vec<u64>), wgpu::BindGroup>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| err("internal lock poisoned by an earlier panic"))
}

impl Ctx {
    pub fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        max_binding: u64,
        f16: bool,
    ) -> Arc<Ctx> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let e = errors.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            if let Ok(mut v) = e.lock() {
                v.push(error.to_string());
            }
        }));
        let e = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                if let Ok(mut v) = e.lock() {
                    v.push(format!("device lost: {msg}"));
                }
            }
        });
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("persona params"),
            size: (SLOT * SLOTS) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let limits = device.limits();
        Arc::new(Ctx {
            device,
            queue,
            info,
            limits,
            max_binding,
            f16,
            errors,
            pending: Mutex::new(Pending { encoder: None, params: vec![0; SLOT * SLOTS], slots: 0, dispatches: 0 }),
            params,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            bind_groups: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Errors wgpu reported since the last check, as one `Error`.
    pub fn check(&self) -> Result<()> {
        let mut v = lock(&self.errors)?;
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        Err(err(msg))
    }

    fn wrap(self: &Arc<Self>, buf: wgpu::Buffer) -> Gbuf {
        Gbuf { buf, id: self.next_id.fetch_add(1, Ordering::Relaxed), ctx: self.clone() }
    }

    fn check_size(&self, bytes: u64, what: &str) -> Result<()> {
        if bytes > self.limits.max_buffer_size {
            return Err(err(format!(
                "{what} needs a buffer of {bytes} bytes, above the adapter's max_buffer_size ({})",
                self.limits.max_buffer_size
            )));
        }
        Ok(())
    }

    /// A zeroed storage buffer of at least `bytes` (wgpu zero-initialises new buffers).
    pub fn storage(self: &Arc<Self>, bytes: u64, what: &str) -> Result<Gbuf> {
        let size = bytes.max(16).next_multiple_of(4);
        self.check_size(size, what)?;
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.check()?;
        Ok(self.wrap(buf))
    }

    /// A storage buffer holding `data` from its creation.
    pub fn storage_init(self: &Arc<Self>, data: &[u8], what: &str) -> Result<Gbuf> {
        let size = (data.len() as u64).max(16).next_multiple_of(4);
        self.check_size(size, what)?;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buf = if data.len() as u64 == size {
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: data, usage })
        } else {
            let mut padded = data.to_vec();
            padded.resize(size as usize, 0);
            self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: &padded, usage })
        };
        self.check()?;
        Ok(self.wrap(buf))
    }

    fn pipeline(&self, k: &Kernel, format: u32) -> Result<Arc<Pipe>> {
        let key = (k.file, k.entry, format);
        if let Some(p) = lock(&self.pipelines)?.get(&key) {
            return Ok(p.clone());
        }
        let module = {
            let mut modules = lock(&self.modules)?;
            if let Some(m) = modules.get(k.file) {
                m.clone()
            } else {
                let src = shader_sources()
                    .into_iter()
                    .find(|(n, _)| *n == k.file)
                    .map(|(_, s)| s)
                    .ok_or_else(|| err(format!("no shader named {}", k.file)))?;
                let m = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(k.file),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                });
                self.check().map_err(|e| err(format!("compiling shaders/{}: {e}", k.file)))?;
                modules.insert(k.file, m.clone());
                m
            }
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        for &(binding, access) in k.bindings {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: access == Access::Read },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(k.entry), entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(k.entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let constants = [("W_FORMAT", format as f64)];
        let uses_format = shader_sources().iter().any(|(n, s)| *n == k.file && s.contains("override W_FORMAT"));
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.entry),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(k.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: if uses_format { &constants } else { &[] },
                // No shader relies on zeroed workgroup memory; skip the clearing prologue.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        self.check().map_err(|e| err(format!("building pipeline {}:{}: {e}", k.file, k.entry)))?;
        let mut pipes = lock(&self.pipelines)?;
        let index = pipes.len();
        let p = Arc::new(Pipe { index, pipeline, layout });
        pipes.insert(key, p.clone());
        Ok(p)
    }

    /// Workgroup counts for `n` workgroups, folded into y past the per-dimension limit; shaders
    /// index workgroups as `wg.x + wg.y * nwg.x` and skip the overhang.
    pub fn grid(&self, n: usize) -> Result<[u32; 3]> {
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        let n = n.max(1);
        let (x, y) = if n <= max { (n, 1) } else { (max, n.div_ceil(max)) };
        if y > max {
            return Err(err(format!(
                "{n} workgroups exceed the adapter's max_compute_workgroups_per_dimension ({max}) squared"
            )));
        }
        Ok([x as u32, y as u32, 1])
    }

    /// Record one dispatch of `k` with `params` (≤ 256 bytes of u32 words) and `bufs` bound, in
    /// order, to the kernel's storage bindings.
    pub fn dispatch(&self, k: &Kernel, format: u32, params: &[u32], bufs: &[&Gbuf], grid: [u32; 3]) -> Result<()> {
        debug_assert_eq!(bufs.len(), k.bindings.len(), "{}", k.entry);
        debug_assert!(params.len() * 4 <= SLOT);
        for b in bufs {
            if b.bytes() > self.limits.max_storage_buffer_binding_size {
                return Err(err(format!(
                    "{}: a buffer of {} bytes exceeds the adapter's max_storage_buffer_binding_size ({})",
                    k.entry,
                    b.bytes(),
                    self.limits.max_storage_buffer_binding_size
                )));
            }
        }
        let pipe = self.pipeline(k, format)?;
        let key = (pipe.index, bufs.iter().map(|b| b.id).collect::<Vec<_>>());
        let bind_group = {
            let mut cache = lock(&self.bind_groups)?;
            match cache.get(&key) {
                Some(bg) => bg.clone(),
                None => {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &self.params,
                            offset: 0,
                            size: wgpu::BufferSize::new(SLOT as u64),
                        }),
                    }];
                    for (&(binding, _), b) in k.bindings.iter().zip(bufs) {
                        entries.push(wgpu::BindGroupEntry { binding, resource: b.buf.as_entire_binding() });
                    }
                    let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(k.entry),
                        layout: &pipe.layout,
                        entries: &entries,
                    });
                    cache.insert(key, bg.clone());
                    bg
                }
            }
        };
        let mut p = lock(&self.pending)?;
        if p.slots == SLOTS {
            self.submit(&mut p)?;
        }
        let offset = p.slots * SLOT;
        p.params[offset..offset + params.len() * 4].copy_from_slice(bytemuck::cast_slice(params));
        p.slots += 1;
        let device = &self.device;
        let enc = p.encoder.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bind_group, &[offset as u32]);
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        p.dispatches += 1;
        if p.dispatches >= FLUSH_EVERY {
            self.submit(&mut p)?;
        }
        drop(p);
        self.check()
    }

    fn submit(&self, p: &mut Pending) -> Result<()> {
        if let Some(enc) = p.encoder.take() {
            if p.slots > 0 {
                self.queue.write_buffer(&self.params, 0, &p.params[..p.slots * SLOT]);
            }
            self.queue.submit([enc.finish()]);
        }
        p.slots = 0;
        p.dispatches = 0;
        self.check()
    }

    /// Submit everything recorded so far.
    pub fn flush(&self) -> Result<()> {
        let mut p = lock(&self.pending)?;
        self.submit(&mut p)
    }

    /// Overwrite the start of `dst` with `data`, after all recorded work.
    pub fn write(&self, dst: &Gbuf, data: &[u8]) -> Result<()> {
        self.flush()?;
        if !data.is_empty() {
            self.queue.write_buffer(&dst.buf, 0, data);
        }
        self.check()
    }

    /// Overwrite `dst` from byte `offset` (a multiple of 4) with `data`, after all recorded work.
    pub fn write_at(&self, dst: &Gbuf, offset: u64, data: &[u8]) -> Result<()> {
        self.flush()?;
        if offset % 4 != 0 || data.len() % 4 != 0 || offset + data.len() as u64 > dst.buf.size() {
            return Err(err(format!(
                "write of {} bytes at {offset} into a buffer of {} bytes",
                data.len(),
                dst.buf.size()
            )));
        }
        if !data.is_empty() {
            self.queue.write_buffer(&dst.buf, offset, data);
        }
        self.check()
    }

    /// The first `bytes` of `src`, after all recorded work has run.
    pub fn read(&self, src: &Gbuf, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("persona read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut p = lock(&self.pending)?;
            let device = &self.device;
            let enc = p.encoder.get_or_insert_with(|| device.create_command_encoder(&Default::default()));
            enc.copy_buffer_to_buffer(&src.buf, 0, &staging, 0, size);
            self.submit(&mut p)?;
        }
        let done = Arc::new(Mutex::new(None));
        let d = done.clone();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            if let Ok(mut d) = d.lock() {
                *d = Some(r);
            }
        });
        // Wait until the callback has run. Another thread's poll may be the one that runs it, a
        // moment after our own wait returns, so wait again (returning at once) until it has.
        let result = loop {
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| err(format!("waiting for the GPU: {e}")))?;
            self.check()?;
            if let Some(r) = lock(&done)?.take() {
                break r;
            }
            std::thread::yield_now();
        };
        result.map_err(|e| err(format!("mapping a read-back buffer: {e}")))?;
        let data = {
            let view = staging.get_mapped_range(..).map_err(|e| err(format!("reading back: {e}")))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        Ok(data)
    }
}
