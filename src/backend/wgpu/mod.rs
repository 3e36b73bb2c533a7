//! The wgpu backend: the forward pass in WGSL compute shaders (`shaders/`), on Vulkan, Metal or
//! DX12 through `wgpu`. Activations are f32; weights stay in their stored format (f32, f16,
//! bf16, see [`weights`]); every op matches the CPU reference (`backend/cpu`), which
//! `persona check --backend wgpu` verifies op by op.
//!
//! GL is not compiled in: wgpu would otherwise silently fall back to a GL software rasteriser
//! when no Vulkan driver is installed. CPU adapters (Mesa's lavapipe, WARP) are accepted by
//! [`WgpuBackend::new`] (tests and CI run on lavapipe) but not for `--backend auto`.
//!
//! ```no_run
//! use persona::backend::wgpu::WgpuBackend;
//! let b = WgpuBackend::new()?;
//! println!("running on {}", b.describe());
//! # Ok::<(), persona::Error>(())
//! ```

mod context;
mod ops;
pub mod weights;

use std::sync::Arc;

pub use context::shader_sources;
use context::{err, Ctx, Gbuf};
pub use ops::{WgpuBuf, WgpuLayout, WgpuPlan, WgpuVectors};
pub use weights::{WeightFormat, WgpuWeight};

use crate::error::Result;

/// How to pick and set up the adapter.
#[derive(Debug, Clone, Default)]
pub struct WgpuOptions {
    /// Use an adapter whose name contains this (case-insensitive). [`WgpuBackend::new`] reads
    /// it from `PERSONA_WGPU_ADAPTER`.
    pub adapter: Option<String>,
    /// Accept CPU adapters (lavapipe, WARP, SwiftShader).
    pub allow_cpu: bool,
    /// Cap one storage binding (and so one weight chunk) below the adapter's limit; tests use
    /// it to exercise the chunked embedding and matmul paths on small tensors.
    pub max_binding_bytes: Option<u64>,
}

/// The wgpu backend. Cloning shares the device.
#[derive(Clone)]
pub struct WgpuBackend {
    ctx: Arc<Ctx>,
    /// Bound where an op's optional input (delta, bias) is absent.
    dummy: Arc<Gbuf>,
}

/// What the shaders need from an adapter, each checked by name.
const NEEDS: &[(&str, u64)] = &[
    ("max_storage_buffers_per_shader_stage", 7),
    ("max_bindings_per_bind_group", 10),
    ("max_compute_invocations_per_workgroup", 256),
    ("max_compute_workgroup_size_x", 256),
    ("max_compute_workgroup_storage_size", 8192),
    ("max_compute_workgroups_per_dimension", 256),
    ("max_uniform_buffers_per_shader_stage", 1),
    ("max_dynamic_uniform_buffers_per_pipeline_layout", 1),
    ("max_uniform_buffer_binding_size", 256),
    ("max_storage_buffer_binding_size", 16 << 20),
    ("max_buffer_size", 16 << 20),
];

fn limit(l: &wgpu::Limits, name: &str) -> u64 {
    match name {
        "max_storage_buffers_per_shader_stage" => l.max_storage_buffers_per_shader_stage as u64,
        "max_bindings_per_bind_group" => l.max_bindings_per_bind_group as u64,
        "max_compute_invocations_per_workgroup" => l.max_compute_invocations_per_workgroup as u64,
        "max_compute_workgroup_size_x" => l.max_compute_workgroup_size_x as u64,
        "max_compute_workgroup_storage_size" => l.max_compute_workgroup_storage_size as u64,
        "max_compute_workgroups_per_dimension" => l.max_compute_workgroups_per_dimension as u64,
        "max_uniform_buffers_per_shader_stage" => l.max_uniform_buffers_per_shader_stage as u64,
        "max_dynamic_uniform_buffers_per_pipeline_layout" => l.max_dynamic_uniform_buffers_per_pipeline_layout as u64,
        "max_uniform_buffer_binding_size" => l.max_uniform_buffer_binding_size,
        "max_storage_buffer_binding_size" => l.max_storage_buffer_binding_size,
        "max_buffer_size" => l.max_buffer_size,
        _ => 0,
    }
}

/// Check an adapter's limits against what the shaders need; the error names the first limit
/// that falls short.
pub fn check_limits(adapter: &str, l: &wgpu::Limits) -> Result<()> {
    for &(name, need) in NEEDS {
        let have = limit(l, name);
        if have < need {
            return Err(err(format!("adapter {adapter}: {name} is {have}, persona's shaders need at least {need}")));
        }
    }
    if l.min_uniform_buffer_offset_alignment > 256 {
        return Err(err(format!(
            "adapter {adapter}: min_uniform_buffer_offset_alignment is {}, persona needs at most 256",
            l.min_uniform_buffer_offset_alignment
        )));
    }
    Ok(())
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl WgpuBackend {
    /// The best adapter (discrete GPU first, CPU adapters last), or the one named by
    /// `PERSONA_WGPU_ADAPTER`.
    pub fn new() -> Result<Self> {
        Self::with_options(WgpuOptions {
            adapter: std::env::var("PERSONA_WGPU_ADAPTER").ok().filter(|s| !s.is_empty()),
            allow_cpu: true,
            max_binding_bytes: None,
        })
    }

    /// The best GPU adapter, CPU adapters excluded (what `--backend auto` tries after CUDA).
    pub fn new_gpu() -> Result<Self> {
        Self::with_options(WgpuOptions {
            adapter: std::env::var("PERSONA_WGPU_ADAPTER").ok().filter(|s| !s.is_empty()),
            allow_cpu: false,
            max_binding_bytes: None,
        })
    }

    /// The best adapter whose name contains `name` (case-insensitive).
    pub fn with_adapter_filter(name: &str) -> Result<Self> {
        Self::with_options(WgpuOptions { adapter: Some(name.to_string()), allow_cpu: true, max_binding_bytes: None })
    }

    /// Pick an adapter by `opts`, check its limits, open a device with all of them.
    pub fn with_options(opts: WgpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12,
            flags: wgpu::InstanceFlags::from_build_config().with_env(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let all = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let seen: Vec<String> = all
            .iter()
            .map(|a| a.get_info())
            .map(|i| format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type))
            .collect();
        let mut usable: Vec<wgpu::Adapter> = all
            .into_iter()
            .filter(|a| {
                let i = a.get_info();
                (opts.allow_cpu || i.device_type != wgpu::DeviceType::Cpu)
                    && opts.adapter.as_ref().map_or(true, |n| i.name.to_lowercase().contains(&n.to_lowercase()))
            })
            .collect();
        usable.sort_by_key(|a| rank(a.get_info().device_type));
        let Some(adapter) = usable.into_iter().next() else {
            let found = if seen.is_empty() { "none".to_string() } else { seen.join(", ") };
            let wanted = match (&opts.adapter, opts.allow_cpu) {
                (Some(n), _) => format!("an adapter named like {n:?}"),
                (None, false) => "a Vulkan, Metal or DX12 GPU adapter (CPU adapters excluded)".to_string(),
                (None, true) => "a Vulkan, Metal or DX12 adapter".to_string(),
            };
            return Err(err(format!(
                "no {wanted}; adapters found: {found} (on Linux without a GPU driver, apt install mesa-vulkan-drivers \
                 provides lavapipe)"
            )));
        };
        let info = adapter.get_info();
        let name = format!("{} ({:?})", info.name, info.backend);
        let down = adapter.get_downlevel_capabilities();
        if !down.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
            return Err(err(format!("adapter {name} has no compute shaders")));
        }
        let limits = adapter.limits();
        check_limits(&name, &limits)?;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("persona"),
            required_features: wgpu::Features::empty(),
            // Everything the adapter offers: the largest bindings and buffers it allows.
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| err(format!("opening adapter {name}: {e}")))?;
        let max_binding = opts
            .max_binding_bytes
            .unwrap_or(u64::MAX)
            .min(limits.max_storage_buffer_binding_size)
            .min(limits.max_buffer_size);
        let f16 = down.flags.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32);
        let ctx = Ctx::new(device, queue, info, max_binding, f16);
        let dummy = Arc::new(ctx.storage(16, "placeholder")?);
        Ok(WgpuBackend { ctx, dummy })
    }

    /// The adapter in use: name, backend (Vulkan, Metal, Dx12), device type, driver.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// "name (backend, device type, driver)".
    pub fn describe(&self) -> String {
        let i = &self.ctx.info;
        format!("{} ({:?}, {:?}, {} {})", i.name, i.backend, i.device_type, i.driver, i.driver_info)
    }

    /// The device's limits (as requested: everything the adapter offers).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.ctx.limits
    }

    /// Whether f16 weights stay f16 on this adapter (else they are widened to f32).
    pub fn keeps_f16(&self) -> bool {
        self.ctx.f16
    }

    /// Largest storage binding used for one weight chunk, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.ctx.max_binding
    }
}
