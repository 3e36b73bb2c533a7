//! Which SIMD code the CPU kernels run, chosen once per process: the best the CPU has, capped by
//! `PERSONA_CPU_SIMD` (`portable`, `avx2` or `avx512`) so the lower paths can be run and tested on a
//! machine that has the higher ones. Every level gives the same results bit for bit (the
//! kernels share one order of arithmetic); only speed differs. (The opt-in 8-bit activations of
//! `q8.rs` are the exception: their levels share the integer sums, not the order of the f32 ones.)

use std::sync::OnceLock;

/// A SIMD level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Plain Rust (whatever the compiler makes of it for the build target).
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2's set plus AVX-512 F, BW, VL and DQ (kernels that have no AVX-512 form run as AVX2).
    Avx512,
}

impl Simd {
    pub fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// The levels this CPU can run, lowest first.
    pub fn available() -> Vec<Simd> {
        [Simd::Portable, Simd::Avx2, Simd::Avx512].into_iter().filter(|&s| s <= detected()).collect()
    }
}

/// The best level this CPU supports (detected once per process).
pub fn detected() -> Simd {
    static DETECTED: OnceLock<Simd> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

fn detect() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512dq")
            {
                return Simd::Avx512;
            }
            return Simd::Avx2;
        }
    }
    Simd::Portable
}

/// The level the kernels use: [`detected`], capped by `PERSONA_CPU_SIMD`. An unknown value is
/// reported once on stderr and ignored.
pub fn active() -> Simd {
    static ACTIVE: OnceLock<Simd> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let best = detected();
        match std::env::var("PERSONA_CPU_SIMD") {
            Err(_) => best,
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" => best,
                "portable" | "scalar" | "none" => Simd::Portable,
                "avx2" => best.min(Simd::Avx2),
                "avx512" => best.min(Simd::Avx512),
                other => {
                    eprintln!(
                        "warning: PERSONA_CPU_SIMD={other:?} is not one of portable, avx2, avx512; using {}",
                        best.name()
                    );
                    best
                }
            },
        }
    })
}
