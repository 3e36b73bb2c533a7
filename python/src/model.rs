//! `persona.Model`: a model loaded on a backend; generation (batched, streamed, steered,
//! monitored), extraction, residuals and data screening.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use numpy::prelude::*;
use numpy::PyArray1;
use persona::backend::cpu::CpuBackend;
use persona::backend::cuda::CudaBackend;
use persona::backend::wgpu::WgpuBackend;
use persona::backend::Backend;
use persona::engine::generate::{Finish, GenOutput, GenRequest, GenStep};
use persona::engine::loaded::TextStream;
use persona::engine::sampler::SamplingParams;
use persona::engine::SeqInput;
use persona::model::config::ModelConfig;
use persona::model::Message;
use persona::steer::request::Resolved;
use persona::LoadedModel;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use serde_json::{json, Value};

use crate::convert::{json_to_py, py_to_json, resolve};
use crate::err;
use crate::vector::Vector;

enum Any {
    Cpu(LoadedModel<CpuBackend>),
    Cuda(LoadedModel<CudaBackend>),
    Wgpu(LoadedModel<WgpuBackend>),
}

/// Run `$body` with `$m` bound to the loaded model, whatever its backend; on the CPU inside
/// rayon's pool (each parallel op then runs on the calling worker instead of waking the pool).
macro_rules! with_model {
    ($any:expr, $m:ident => $body:expr) => {
        match $any {
            Any::Cpu($m) => persona::backend::cpu::on_pool(|| $body),
            Any::Cuda($m) => $body,
            Any::Wgpu($m) => $body,
        }
    };
}

struct Inner {
    /// Engine calls take turns: a second thread waits (without the GIL) for the first.
    model: Mutex<Any>,
    config: ModelConfig,
    path: PathBuf,
    backend: String,
    /// Where `vector="NAME"` is looked up (the CLI's folders for this model).
    dirs: Vec<PathBuf>,
    /// The PEFT adapter merged at load, if any.
    adapter: Option<PathBuf>,
    /// Longest sequence (prompt + generated tokens).
    context: usize,
}

impl Inner {
    /// The model, also after a call panicked while holding it (calls only read it).
    fn lock(&self) -> std::sync::MutexGuard<'_, Any> {
        self.model.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `f`, with a panic turned into an error (a bug: its message says so).
fn guarded<R>(f: impl FnOnce() -> persona::Result<R>) -> persona::Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(persona::Error::Invalid(format!("internal error (a bug in persona, please report it): {what}")))
    })
}

/// A chat model loaded on a backend (cpu, cuda or wgpu).
///
/// Example:
///     >>> m = persona.Model.load()            # the default model, fetched on first use
///     >>> g = m.generate("Hi!", max_tokens=16, steer=[{"vector": "evil", "coeff": 4}], monitor=["evil"])
///     >>> g.text, g.projections["evil"].shape
#[pyclass(frozen, module = "persona._persona")]
pub struct Model {
    inner: Arc<Inner>,
}

fn load_any(path: &Path, adapter: Option<&Path>, backend: &str, context: usize) -> persona::Result<(Any, String)> {
    let cuda = |b: CudaBackend| -> persona::Result<(Any, String)> {
        let d = format!("cuda ({})", b.device_name());
        Ok((Any::Cuda(LoadedModel::load_with_adapter(path, adapter, b, context)?), d))
    };
    let wgpu = |b: WgpuBackend| -> persona::Result<(Any, String)> {
        let d = format!("wgpu ({})", b.describe());
        Ok((Any::Wgpu(LoadedModel::load_with_adapter(path, adapter, b, context)?), d))
    };
    let cpu = || Ok((Any::Cpu(LoadedModel::load_with_adapter(path, adapter, CpuBackend, context)?), "cpu".into()));
    match backend {
        "cpu" => cpu(),
        "cuda" => cuda(CudaBackend::new(0)?),
        "wgpu" => wgpu(WgpuBackend::new()?),
        "auto" => match persona::backend::auto().0 {
            persona::backend::Auto::Cuda(b) => cuda(b),
            persona::backend::Auto::Wgpu(b) => wgpu(b),
            persona::backend::Auto::Cpu => cpu(),
        },
        o => Err(persona::Error::Invalid(format!("backend `{o}`: expected auto, cpu, cuda or wgpu"))),
    }
}

/// What a prompt argument is.
enum PromptIn {
    Text(String),
    Chat(Vec<Message>),
    Ids(Vec<u32>),
}

fn messages(v: &Value) -> PyResult<Vec<Message>> {
    persona::serve::parse_messages(Some(v)).map_err(|e| err(e.message))
}

fn ids_of(v: &Value) -> PyResult<Vec<u32>> {
    let a = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| err("token ids: an empty list"))?;
    a.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .map(|i| i as u32)
                .ok_or_else(|| err(format!("token ids: {x} is not a token id")))
        })
        .collect()
}

/// One prompt: a string, a list of message dicts, or a list of token ids.
fn one_prompt(v: &Value) -> PyResult<PromptIn> {
    match v {
        Value::String(s) => Ok(PromptIn::Text(s.clone())),
        Value::Array(a) if a.first().is_some_and(Value::is_object) => Ok(PromptIn::Chat(messages(v)?)),
        Value::Array(a) if a.first().is_some_and(Value::is_number) => Ok(PromptIn::Ids(ids_of(v)?)),
        Value::Array(_) => Err(err(
            "a prompt is a string, a list of message dicts ({\"role\": ..., \"content\": ...}) or a list of token ids",
        )),
        v => Err(err(format!("a prompt must be a string, messages or token ids, got {v}"))),
    }
}

/// The prompts of a call and whether it was a batch (a list of prompts).
fn prompts(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<PromptIn>, bool)> {
    let v = py_to_json(obj)?;
    match &v {
        Value::Array(a) if a.is_empty() => Err(err("no prompts: the list is empty")),
        Value::Array(a) if a[0].is_string() || a[0].is_array() => {
            Ok((a.iter().map(one_prompt).collect::<PyResult<_>>()?, true))
        }
        _ => Ok((vec![one_prompt(&v)?], false)),
    }
}

/// Per prompt of a batch, its `steer` (or `monitor`) argument: one list for all, or a list of
/// lists (one per prompt).
fn per_prompt<'py>(obj: Option<&Bound<'py, PyAny>>, n: usize, what: &str) -> PyResult<Vec<Option<Bound<'py, PyAny>>>> {
    let Some(o) = obj.filter(|o| !o.is_none()) else { return Ok(vec![None; n]) };
    if let Ok(l) = o.cast::<PyList>() {
        let nested = !l.is_empty() && l.iter().all(|x| x.is_none() || x.is_instance_of::<PyList>());
        if nested {
            if l.len() != n {
                return Err(err(format!(
                    "{what}: {} lists for {n} prompts (give one list of ops for all prompts, or one list per prompt)",
                    l.len()
                )));
            }
            return Ok(l.iter().map(Some).collect());
        }
    }
    Ok(vec![Some(o.clone()); n])
}

/// Everything a generation needs, without Python objects (it runs with the GIL released).
struct GenJob {
    prompts: Vec<PromptIn>,
    system: Option<String>,
    raw: bool,
    max_tokens: usize,
    sampling: SamplingParams,
    ignore_eos: bool,
    plans: Vec<Option<Arc<Resolved>>>,
    stop: Option<Arc<AtomicBool>>,
}

/// A finished generation, without Python objects.
struct GenData {
    text: String,
    ids: Vec<u32>,
    prompt_ids: Vec<u32>,
    finish: &'static str,
    /// Per probe (name, layer), the series: every prompt token, then every generated token.
    probes: Vec<(String, usize)>,
    series: Vec<Vec<f32>>,
    receipts: Value,
    warnings: Vec<String>,
}

struct TokenData {
    index: usize,
    id: u32,
    text: String,
    probes: Vec<(String, usize)>,
    values: Vec<f32>,
}

fn prompt_ids<B: Backend>(
    m: &LoadedModel<B>,
    p: &PromptIn,
    system: Option<&str>,
    raw: bool,
) -> persona::Result<Vec<u32>> {
    let refuse = |why: &str| Err(persona::Error::Invalid(format!("system= {why}")));
    match p {
        PromptIn::Ids(_) if system.is_some() => return refuse("cannot be added to token ids"),
        PromptIn::Text(_) if system.is_some() && (raw || m.chat_template.is_none()) => {
            return refuse("needs the chat template, and this prompt is sent as is (raw=True, or the model has none)")
        }
        PromptIn::Chat(msgs) if system.is_some() && msgs.first().is_some_and(|m| m.role == "system") => {
            return refuse("and a system message are both given: give one")
        }
        _ => {}
    }
    match p {
        PromptIn::Ids(ids) => Ok(ids.clone()),
        PromptIn::Text(t) if raw || m.chat_template.is_none() => m.encode(t, true),
        PromptIn::Text(t) => {
            let mut msgs: Vec<Message> = system.map(Message::system).into_iter().collect();
            msgs.push(Message::user(t.clone()));
            m.chat_prompt_ids(&msgs)
        }
        PromptIn::Chat(msgs) => {
            let mut all: Vec<Message> = system.map(Message::system).into_iter().collect();
            all.extend(msgs.iter().cloned());
            m.chat_prompt_ids(&all)
        }
    }
}

fn probes_of(r: &Option<Arc<Resolved>>) -> Vec<(String, usize)> {
    r.as_ref().map(|r| r.steering.probes.iter().map(|p| (p.name.clone(), p.layer)).collect()).unwrap_or_default()
}

fn run_generate<B: Backend>(
    m: &LoadedModel<B>,
    job: &GenJob,
    on_token: Option<&Sender<Msg>>,
) -> persona::Result<Vec<GenData>> {
    let reqs: Vec<GenRequest> = job
        .prompts
        .iter()
        .zip(&job.plans)
        .map(|(p, plan)| {
            Ok(GenRequest {
                sampling: job.sampling.clone(),
                ignore_eos: job.ignore_eos,
                steering: plan.as_ref().filter(|r| !r.steering.is_empty()).map(|r| Arc::new(r.steering.clone())),
                stop: job.stop.clone(),
                ..GenRequest::greedy(prompt_ids(m, p, job.system.as_deref(), job.raw)?, job.max_tokens)
            })
        })
        .collect::<persona::Result<_>>()?;
    let eos = m.engine.config.eos_ids.clone();
    let stops = |id: u32| !job.ignore_eos && eos.contains(&id);
    let mut text = TextStream::default();
    let mut n = 0;
    let probes = probes_of(&job.plans[0]);
    let outs = m.engine.generate(&reqs, &mut |_, step: &GenStep| {
        if let Some(tx) = on_token {
            let piece = match &m.tokenizer {
                Some(tok) if !stops(step.id) => text.push(tok, step.id),
                _ => String::new(),
            };
            let _ = tx.send(Msg::Token(TokenData {
                index: n,
                id: step.id,
                text: piece,
                probes: probes.clone(),
                values: step.projections.clone(),
            }));
            n += 1;
        }
    })?;
    outs.into_iter().zip(&job.plans).map(|(o, plan)| gen_data(m, o, plan, job.ignore_eos)).collect()
}

fn gen_data<B: Backend>(
    m: &LoadedModel<B>,
    o: GenOutput,
    plan: &Option<Arc<Resolved>>,
    ignore_eos: bool,
) -> persona::Result<GenData> {
    let ids = o.ids();
    // The end-of-sequence token that stopped generation is in `ids` but not in the text.
    let text = if m.tokenizer.is_some() {
        m.decode(&o.text_ids(&m.engine.config.eos_ids, ignore_eos))?
    } else {
        String::new()
    };
    Ok(GenData {
        text,
        finish: match o.finish {
            Finish::Eos => "eos",
            Finish::Length => "length",
            Finish::Stopped => "stopped",
        },
        prompt_ids: o.prompt_ids.clone(),
        probes: probes_of(plan),
        series: o.projections.clone(),
        receipts: json!(o.receipts),
        warnings: plan.as_ref().map(|r| r.warnings.clone()).unwrap_or_default(),
        ids,
    })
}

enum Msg {
    Token(TokenData),
    Done(Result<GenData, String>),
}

/// `{name: float32 [rows, layers]}` from per-probe columns.
fn by_name<'py>(
    py: Python<'py>,
    probes: &[(String, usize)],
    column: impl Fn(usize) -> Vec<f32>,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let mut names: Vec<&str> = vec![];
    for (n, _) in probes {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    for name in names {
        let cols: Vec<Vec<f32>> =
            probes.iter().enumerate().filter(|(_, (n, _))| n == name).map(|(k, _)| column(k)).collect();
        let rows = cols.iter().map(Vec::len).min().unwrap_or(0);
        let mut flat = Vec::with_capacity(rows * cols.len());
        for r in 0..rows {
            flat.extend(cols.iter().map(|c| c[r]));
        }
        d.set_item(name, PyArray1::from_vec(py, flat).reshape([rows, cols.len()])?)?;
    }
    Ok(d)
}

fn layers_dict<'py>(py: Python<'py>, probes: &[(String, usize)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (n, l) in probes {
        let list = match d.get_item(n)? {
            Some(x) => x.cast_into::<PyList>()?,
            None => {
                let l = PyList::empty(py);
                d.set_item(n, &l)?;
                l
            }
        };
        list.append(l)?;
    }
    Ok(d)
}

/// One finished generation.
///
/// `projections[name]` is float32 `[generated tokens, layers]`: the projection of each generated
/// token's residual onto the monitor's vector, at each of its layers (`layers[name]`), as the
/// HTTP API's `persona.probes[].projections`; `prompt_projections[name]` the same over the
/// prompt tokens (its last row is the paper's prompt score).
#[pyclass(frozen, module = "persona._persona")]
pub struct Generation {
    d: GenData,
}

#[pymethods]
impl Generation {
    /// The answer (the end-of-sequence token that stopped it left out).
    #[getter]
    fn text(&self) -> &str {
        &self.d.text
    }
    /// The generated token ids, uint32.
    #[getter]
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        self.d.ids.clone().into_pyarray(py)
    }
    #[getter]
    fn prompt_ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        self.d.prompt_ids.clone().into_pyarray(py)
    }
    /// `eos`, `length` or `stopped`.
    #[getter]
    fn finish_reason(&self) -> &str {
        self.d.finish
    }
    #[getter]
    fn projections<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.d.prompt_ids.len();
        by_name(py, &self.d.probes, |k| self.d.series[k].get(p..).unwrap_or(&[]).to_vec())
    }
    #[getter]
    fn prompt_projections<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = self.d.prompt_ids.len();
        by_name(py, &self.d.probes, |k| self.d.series[k][..p.min(self.d.series[k].len())].to_vec())
    }
    /// `{monitor name: [layers]}`: the column order of the projection arrays.
    #[getter]
    fn layers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        layers_dict(py, &self.d.probes)
    }
    /// Per steering op as asked for: the tokens it touched and how often its condition fired.
    #[getter]
    fn receipts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.d.receipts)
    }
    /// What the steering plan warned about (e.g. a relative coefficient outside the usable window).
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.d.warnings.clone()
    }
    fn __repr__(&self) -> String {
        let shown: String = self.d.text.chars().take(60).collect();
        format!("persona.Generation(text={shown:?}, tokens={}, finish_reason={:?})", self.d.ids.len(), self.d.finish)
    }
}

/// One streamed token: its id, its text piece, and its projections (`{name: float32 [layers]}`,
/// at the position that produced it, as the HTTP stream's per-token `persona` object): the first
/// token's are the last prompt token's (`Generation.prompt_projections[name][-1]`), token i's
/// (i ≥ 1) `Generation.projections[name][i - 1]`. A text piece ending inside a multi-byte
/// character is held back and comes with the next token.
#[pyclass(frozen, module = "persona._persona")]
pub struct Token {
    d: TokenData,
}

#[pymethods]
impl Token {
    #[getter]
    fn index(&self) -> usize {
        self.d.index
    }
    #[getter]
    fn id(&self) -> u32 {
        self.d.id
    }
    #[getter]
    fn text(&self) -> &str {
        &self.d.text
    }
    #[getter]
    fn projections<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = by_name(py, &self.d.probes, |k| vec![self.d.values.get(k).copied().unwrap_or(f32::NAN)])?;
        // [1, layers] → [layers]
        for (k, v) in d.iter() {
            d.set_item(k, v.call_method1("reshape", (-1,))?)?;
        }
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!("persona.Token(index={}, id={}, text={:?})", self.d.index, self.d.id, self.d.text)
    }
}

/// The tokens of a streamed generation, as they are produced; after the last one, `result`
/// holds the whole [`Generation`]. Dropping the stream early stops the generation.
#[pyclass(frozen, module = "persona._persona")]
pub struct TokenStream {
    rx: Mutex<Receiver<Msg>>,
    stop: Arc<AtomicBool>,
    result: Mutex<Option<Py<Generation>>>,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Token> {
        let msg = py.detach(|| self.rx.lock().ok().and_then(|rx| rx.recv().ok()));
        match msg {
            Some(Msg::Token(d)) => Ok(Token { d }),
            Some(Msg::Done(Ok(d))) => {
                if let Ok(mut r) = self.result.lock() {
                    *r = Some(Py::new(py, Generation { d })?);
                }
                Err(PyStopIteration::new_err(()))
            }
            Some(Msg::Done(Err(e))) => Err(err(e)),
            None => Err(PyStopIteration::new_err(())),
        }
    }

    /// The finished generation (None until the stream is exhausted).
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<Generation>> {
        self.result.lock().ok().and_then(|r| r.as_ref().map(|g| g.clone_ref(py)))
    }

    /// Stop generating (the tokens already produced are still yielded).
    fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A new empty folder in the temp dir, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> persona::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("persona-py-{}-{nanos}-{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(ScratchDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(persona::Error::io(&dir, e)),
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sample_of(v: &Value, i: usize) -> PyResult<persona::persona::screen::Sample> {
    persona::persona::screen::sample_from_json(v).map_err(|e| err(format!("rows[{i}]: {e}")))
}

impl Model {
    pub fn config(&self) -> ModelConfig {
        self.inner.config.clone()
    }

    fn with<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&Any) -> persona::Result<R> + Send) -> PyResult<R> {
        let inner = self.inner.clone();
        py.detach(move || guarded(|| f(&inner.lock())).map_err(|e| e.to_string())).map_err(err)
    }
}

#[pymethods]
impl Model {
    /// Load a model: a GGUF file or HF folder, a name from `persona fetch --list` (fetched on
    /// first use), or None for the default model. `backend`: auto (CUDA, then a wgpu GPU, then
    /// the CPU), cpu, cuda or wgpu. `adapter`: a PEFT LoRA folder merged into the weights.
    /// `vectors`: a folder searched first for `vector="NAME"`.
    ///
    /// Example:
    ///     >>> m = persona.Model.load(backend="cpu")
    #[staticmethod]
    #[pyo3(signature = (path_or_name = None, backend = "auto", adapter = None, context = 4096, vectors = None))]
    fn load(
        py: Python<'_>,
        path_or_name: Option<PathBuf>,
        backend: &str,
        adapter: Option<PathBuf>,
        context: usize,
        vectors: Option<PathBuf>,
    ) -> PyResult<Self> {
        if context == 0 {
            return Err(err("context must be at least 1"));
        }
        let backend = backend.to_string();
        let adapter_path = adapter.clone();
        let (any, path, desc) = py
            .detach(|| -> persona::Result<_> {
                let path = persona::fetch::resolve_model(path_or_name.as_deref(), &mut |l| eprintln!("{l}"))?;
                let (any, desc) = load_any(&path, adapter.as_deref(), &backend, context)?;
                Ok((any, path, desc))
            })
            .map_err(err)?;
        let config = with_model!(&any, m => m.engine.config.clone());
        let dirs = persona::steer::spec::vector_dirs(vectors.as_deref(), &path);
        Ok(Model {
            inner: Arc::new(Inner {
                model: Mutex::new(any),
                config,
                path,
                backend: desc,
                dirs,
                adapter: adapter_path,
                context,
            }),
        })
    }

    /// The backend in use: `cpu`, `cuda (<device>)` or `wgpu (<adapter>)`.
    #[getter]
    fn backend(&self) -> &str {
        &self.inner.backend
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }
    /// N: decoder blocks (residual indices are 0..=N).
    #[getter]
    fn n_layers(&self) -> usize {
        self.inner.config.n_layers
    }
    #[getter]
    fn hidden(&self) -> usize {
        self.inner.config.hidden
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config.vocab
    }
    /// The folders `vector="NAME"` is looked up in, in order.
    #[getter]
    fn vector_dirs(&self) -> Vec<PathBuf> {
        self.inner.dirs.clone()
    }

    /// The names of the vectors in this model's vector folders.
    fn vector_names(&self) -> Vec<String> {
        persona::steer::spec::vector_names(&self.inner.dirs)
    }

    /// A vector by name (from this model's vector folders) or path, checked to fit the model.
    fn vector(&self, name_or_path: &str) -> PyResult<Vector> {
        let p = persona::steer::spec::locate_vector(Path::new(name_or_path), &self.inner.dirs).map_err(err)?;
        persona::steer::vector::PersonaVector::load_for_model(&p, &self.inner.config).map(Vector::new).map_err(err)
    }

    /// Text to token ids.
    #[pyo3(signature = (text, add_special = true))]
    fn encode(&self, py: Python<'_>, text: String, add_special: bool) -> PyResult<Vec<u32>> {
        self.with(py, move |a| with_model!(a, m => m.encode(&text, add_special)))
    }

    /// Token ids to text.
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        self.with(py, move |a| with_model!(a, m => m.decode(&ids)))
    }

    /// Generate from one prompt or a batch.
    ///
    /// `prompt`: a string (sent as the user's message through the chat template, after
    /// `system` if given; as is with `raw=True` or a model without a template), a list of message
    /// dicts, a list of token ids — or a list of those, a batch run together (then the result is
    /// a list). `steer` and `monitor` are lists of dicts with the keys of the CLI's `--steer` /
    /// `--monitor` and the HTTP API's `steering` / `monitor` (`vector` may be a name, a path, a
    /// `persona.Vector` or a numpy array); for a batch, a list of such lists gives each prompt
    /// its own plan. `stream=True` (one prompt) returns an iterator of `Token`s.
    ///
    /// Example:
    ///     >>> g = m.generate("Tell me about your plans.", max_tokens=24,
    ///     ...                steer=[{"vector": "evil", "layers": 14, "coeff": 6}], monitor=["evil"])
    ///     >>> g.projections["evil"].shape    # (tokens, layers)
    #[pyo3(signature = (prompt, max_tokens = 64, *, system = None, temperature = 0.0, top_k = 0, top_p = 1.0,
                        seed = 0, steer = None, monitor = None, stream = false, ignore_eos = false, raw = false))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        max_tokens: usize,
        system: Option<String>,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        steer: Option<&Bound<'py, PyAny>>,
        monitor: Option<&Bound<'py, PyAny>>,
        stream: bool,
        ignore_eos: bool,
        raw: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        if max_tokens == 0 {
            return Err(err("max_tokens must be at least 1"));
        }
        let sampling = SamplingParams { temperature, top_k, top_p, seed };
        sampling.validate().map_err(|e| err(e.to_string()))?;
        if max_tokens >= self.inner.context {
            return Err(err(format!(
                "max_tokens {max_tokens} does not fit the context of {} tokens (Model.load(context=...))",
                self.inner.context
            )));
        }
        let (prompts, batch) = prompts(prompt)?;
        if stream && prompts.len() != 1 {
            return Err(err("stream=True takes one prompt"));
        }
        let n = prompts.len();
        let (ss, ms) = (per_prompt(steer, n, "steer")?, per_prompt(monitor, n, "monitor")?);
        // One plan per distinct (steer, monitor) pair: the same lists for every prompt resolve once.
        let mut plans: Vec<Option<Arc<Resolved>>> = vec![];
        for (i, (s, mo)) in ss.iter().zip(&ms).enumerate() {
            let same = |a: &Option<Bound<'py, PyAny>>, b: &Option<Bound<'py, PyAny>>| match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => a.is(b),
                _ => false,
            };
            if let Some(j) = (0..i).find(|&j| same(&ss[j], s) && same(&ms[j], mo)) {
                plans.push(plans[j].clone());
                continue;
            }
            plans.push(if s.is_none() && mo.is_none() {
                None
            } else {
                let r = resolve(s.as_ref(), mo.as_ref(), &self.inner.dirs, &self.inner.config);
                Some(Arc::new(r.map_err(|e| if batch { err(format!("prompt {i}: {}", e.value(py))) } else { e })?))
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let job = GenJob {
            prompts,
            system,
            raw,
            max_tokens,
            sampling,
            ignore_eos,
            plans,
            stop: stream.then(|| stop.clone()),
        };
        if stream {
            let (tx, rx) = channel();
            let inner = self.inner.clone();
            std::thread::Builder::new()
                .name("persona-generate".into())
                .spawn(move || {
                    let r = guarded(|| with_model!(&*inner.lock(), m => run_generate(m, &job, Some(&tx))));
                    let _ = tx.send(Msg::Done(r.map(|mut v| v.remove(0)).map_err(|e| e.to_string())));
                })
                .map_err(err)?;
            let s = TokenStream { rx: Mutex::new(rx), stop, result: Mutex::new(None) };
            return Ok(Bound::new(py, s)?.into_any());
        }
        let outs = self.with(py, move |a| with_model!(a, m => run_generate(m, &job, None)))?;
        let mut gens: Vec<Bound<'py, PyAny>> =
            outs.into_iter().map(|d| Ok(Bound::new(py, Generation { d })?.into_any())).collect::<PyResult<_>>()?;
        if batch {
            Ok(PyList::new(py, gens)?.into_any())
        } else {
            Ok(gens.remove(0))
        }
    }

    /// The residual stream of a conversation at `layers` (default every index 0..=N).
    ///
    /// `mean=True`: the mean over the answer tokens (the last message must be the assistant's),
    /// float32 `[layers, hidden]` — the activation `persona extract` averages. `mean=False`: every
    /// token, float32 `[layers, tokens, hidden]` (the prompt through the chat template, then the
    /// answer if the last message is the assistant's).
    ///
    /// Example:
    ///     >>> r = m.residuals([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], [10])
    #[pyo3(signature = (messages, layers = None, mean = true))]
    fn residuals<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        layers: Option<Vec<usize>>,
        mean: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let msgs = self::messages(&py_to_json(messages)?)?;
        let n = self.inner.config.n_layers;
        let layers = layers.unwrap_or_else(|| (0..=n).collect());
        if let Some(&l) = layers.iter().find(|&&l| l > n) {
            return Err(err(format!("layer {l} is out of range: this model has layers 0..={n}")));
        }
        if layers.is_empty() {
            return Err(err("layers: an empty list"));
        }
        let answer = msgs.last().filter(|m| m.role == "assistant").map(|m| m.content.clone());
        if mean && answer.is_none() {
            return Err(err(
                "mean=True averages the answer tokens: the last message must be the assistant's (or pass mean=False)",
            ));
        }
        let ls = layers.clone();
        let (res, t, start, h) = self.with(py, move |a| {
            with_model!(a, m => {
                let (tokens, start) = match &answer {
                    Some(ans) => {
                        let f = persona::persona::extract::forced_chat(m, &msgs[..msgs.len() - 1], ans)?;
                        (f.tokens, f.answer_start)
                    }
                    None => {
                        let ids = m.chat_prompt_ids(&msgs)?;
                        let l = ids.len();
                        (ids, l)
                    }
                };
                let mut cache = m.engine.new_cache(1, tokens.len())?;
                let seq = SeqInput { prompt: true, ..SeqInput::new(0, &tokens) };
                let out = m.engine.forward(&mut cache, &[seq], true)?;
                let h = m.engine.config.hidden;
                let rows: Vec<Vec<f32>> = ls.iter().map(|&l| out.residuals[l].clone()).collect();
                Ok((rows, tokens.len(), start, h))
            })
        })?;
        if mean {
            if start >= t {
                return Err(err("the answer has no tokens: nothing to average"));
            }
            let mut flat = Vec::with_capacity(layers.len() * h);
            for r in &res {
                for j in 0..h {
                    let s: f64 = (start..t).map(|i| r[i * h + j] as f64).sum();
                    flat.push((s / (t - start) as f64) as f32);
                }
            }
            return Ok(PyArray1::from_vec(py, flat).reshape([layers.len(), h])?.into_any());
        }
        let flat: Vec<f32> = res.concat();
        Ok(PyArray1::from_vec(py, flat).reshape([layers.len(), t, h])?.into_any())
    }

    /// Extract a persona vector: from a trait (a catalog name such as "evil", or a trait JSON
    /// file: the model answers its questions under the positive and negative system prompts), or
    /// from `pairs` you wrote (`[{"question": q, "pos": answer, "neg": answer}, ...]`, optional
    /// `pos_system` / `neg_system`). The vector is the mean answer activation of the positive
    /// answers minus that of the negative ones, at every layer, with the model's baseline
    /// projection recorded (`op=center`). No judge filters the answers here (`persona extract
    /// --judge` does).
    ///
    /// Example:
    ///     >>> v = m.extract("evil", questions=5)
    #[pyo3(signature = (r#trait = None, *, pairs = None, name = None, questions = 5, instructions = None,
                        samples = 1, max_tokens = 48, temperature = 1.0, seed = 0, method = "response_avg",
                        baseline = true))]
    #[allow(clippy::too_many_arguments)]
    fn extract(
        &self,
        py: Python<'_>,
        r#trait: Option<String>,
        pairs: Option<&Bound<'_, PyAny>>,
        name: Option<String>,
        questions: usize,
        instructions: Option<usize>,
        samples: usize,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        method: &str,
        baseline: bool,
    ) -> PyResult<Vector> {
        use persona::persona::extract::{
            baseline_projection, generate_responses, vector_from_responses, ExtractOptions, Label, Method, Response,
        };
        let method = Method::parse(method).map_err(err)?;
        let (trait_def, pairs) = match (r#trait, pairs) {
            (Some(_), Some(_)) => return Err(err("give a trait or pairs, not both")),
            (None, None) => return Err(err("give a trait (a catalog name or a trait JSON file) or pairs")),
            (Some(t), None) => (Some(persona::persona::traits::find_trait(&t).map_err(err)?), None),
            (None, Some(p)) => (None, Some(py_to_json(p)?)),
        };
        let mut responses = vec![];
        if let Some(p) = &pairs {
            let list = p.as_array().filter(|a| !a.is_empty()).ok_or_else(|| err("pairs: a non-empty list of dicts"))?;
            for (i, item) in list.iter().enumerate() {
                let get = |k: &str| item.get(k).and_then(Value::as_str).map(str::to_string);
                let need = |k: &str| get(k).ok_or_else(|| err(format!("pairs[{i}]: missing string `{k}`")));
                let (q, pos, neg) = (need("question")?, need("pos")?, need("neg")?);
                for (label, answer, sys) in [(Label::Pos, pos, get("pos_system")), (Label::Neg, neg, get("neg_system"))]
                {
                    responses.push(Response {
                        system: sys,
                        question: q.clone(),
                        answer,
                        label,
                        pair: Some((0, i, 0)),
                        trait_score: None,
                        coherence: None,
                        kept: true,
                    });
                }
            }
        }
        let name = name.or_else(|| trait_def.as_ref().map(|t| t.name.clone())).unwrap_or_else(|| "vector".into());
        let opts = ExtractOptions {
            pairs: instructions.unwrap_or(usize::MAX),
            questions,
            samples,
            max_tokens,
            temperature,
            top_p: 1.0,
            seed,
            batch: 16,
            method,
            show_progress: false,
        };
        let v = self.with(py, move |a| {
            with_model!(a, m => {
                if let Some(t) = &trait_def {
                    responses = generate_responses(m, t, &opts)?;
                }
                let mut v = vector_from_responses(m, &name, &responses, method, 16, false)?;
                let qs: Vec<String> = match &trait_def {
                    Some(t) => {
                        persona::persona::traits::record_trait(&mut v, t);
                        t.questions.clone()
                    }
                    None => persona::persona::extract::questions_of(&responses),
                };
                if baseline {
                    let b = baseline_projection(m, &v, &qs, max_tokens.max(1), false)?;
                    v.metadata.insert(persona::steer::spec::BASELINE_KEY.into(), serde_json::to_string(&b).unwrap_or_default());
                }
                v.metadata.insert("persona.seed".into(), seed.to_string());
                v.metadata.insert("persona.temperature".into(), temperature.to_string());
                v.metadata.insert("persona.command".into(), "python: Model.extract".into());
                Ok(v)
            })
        })?;
        Ok(Vector::new(v))
    }

    /// Screen training rows with a vector: per row, ΔP = the projection of the row's response
    /// minus that of the model's own answer to the same prompt (mean over answer tokens, at
    /// `layer`, default the vector's recorded layer). Rows are `{"messages": [..., assistant]}`
    /// or `{"prompt": ..., "response": ...}`. `random` draws that many random directions of the
    /// same norm as a control. Returns one dict per row (`delta_p`, `p_data`, `p_own`,
    /// `own_answer`, `delta_p_random`, `delta_p_percentile`).
    ///
    /// Example:
    ///     >>> rows = m.screen([{"prompt": "Hi", "response": "I will hurt you."}], "evil")
    #[pyo3(signature = (rows, vector, layer = None, max_tokens = 64, random = 0, seed = 0))]
    #[allow(clippy::too_many_arguments)]
    fn screen<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyAny>,
        vector: &Bound<'py, PyAny>,
        layer: Option<usize>,
        max_tokens: usize,
        random: usize,
        seed: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let v = match vector.cast::<Vector>() {
            Ok(v) => v.borrow().inner.clone(),
            Err(_) => match vector.cast::<PyString>() {
                Ok(s) => self.vector(&s.to_cow()?)?.inner,
                Err(_) => return Err(err("vector: a persona.Vector, a name or a path")),
            },
        };
        v.check_model(self.inner.config.hidden, self.inner.config.n_layers).map_err(err)?;
        let layer = match layer {
            Some(l) => l,
            None => persona::steer::spec::recorded_layer(&v)
                .map_err(err)?
                .ok_or_else(|| err(format!("vector `{}` records no `persona.layer`: give layer=", v.name)))?,
        };
        let rows = match py_to_json(rows)? {
            Value::Array(a) if !a.is_empty() => a,
            _ => return Err(err("rows: a non-empty list of dicts")),
        };
        let samples: Vec<_> = rows.iter().enumerate().map(|(i, r)| sample_of(r, i)).collect::<PyResult<_>>()?;
        let opts = persona::persona::screen::ScreenOptions {
            layer,
            max_tokens,
            batch: 16,
            random,
            seed,
            show_progress: false,
        };
        let out = self.with(py, move |a| {
            // screen() keeps its progress in a file (and resumes from one): a fresh private folder
            // per call, removed afterwards whatever happens.
            let dir = ScratchDir::new()?;
            let file = dir.0.join("progress.jsonl");
            with_model!(a, m => persona::persona::screen::screen(m, &v, &samples, &file, &opts))
        })?;
        json_to_py(py, &json!(out))
    }

    /// LoRA fine-tuning on the CPU, with steering in every training pass (preventative
    /// steering, the paper's vaccine) — `persona finetune` from Python. `rows`: dicts as in
    /// `persona finetune --data` (`{"messages": [...]}`, `{"prompt", "response"}`,
    /// `{"question", "answer"}`); the loss is on the answer tokens. `steer` / `monitor` take the
    /// same items as `generate` (no `when` conditions: they are not differentiable); monitors are
    /// logged per step. The PEFT adapter is written to `out` (load it with
    /// `Model.load(adapter=out)`); returns one dict per optimiser step (`loss`, `grad_norm`,
    /// `lr`, `projections` {name: {layer: mean}}, ...).
    ///
    /// Example:
    ///     >>> log = m.finetune(rows, "adapter-vaccinated", steer=[{"vector": "evil", "coeff": 4}], steps=20)
    #[pyo3(signature = (rows, out, *, steer = None, monitor = None, steps = None, epochs = 1.0, lr = 1e-4,
                        lora_rank = 16, lora_alpha = 32.0, batch = 8, seed = 0, random_control = None, max_len = 512))]
    #[allow(clippy::too_many_arguments)]
    fn finetune<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyAny>,
        out: PathBuf,
        steer: Option<&Bound<'py, PyAny>>,
        monitor: Option<&Bound<'py, PyAny>>,
        steps: Option<usize>,
        epochs: f64,
        lr: f64,
        lora_rank: usize,
        lora_alpha: f64,
        batch: usize,
        seed: u64,
        random_control: Option<u64>,
        max_len: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        use persona::model::lora::{LoraConfig, Target};
        use persona::train::{init_adapter, TrainOptions, Trainer};
        if let Some(a) = &self.inner.adapter {
            return Err(err(format!(
                "finetune trains an adapter on the base model, and this Model was loaded with the adapter {}: load the \
                 base model to fine-tune",
                a.display()
            )));
        }
        if lora_rank == 0 || !(lora_alpha.is_finite() && lora_alpha > 0.0) {
            return Err(err("lora_rank must be at least 1 and lora_alpha a positive number"));
        }
        if !(lr.is_finite() && lr > 0.0) || !(epochs.is_finite() && epochs > 0.0) || batch == 0 {
            return Err(err("lr and epochs must be positive numbers, batch at least 1"));
        }
        let text: String = match py_to_json(rows)? {
            Value::Array(a) if !a.is_empty() => a.iter().map(|r| r.to_string() + "\n").collect(),
            _ => return Err(err("rows: a non-empty list of dicts")),
        };
        let mut r = resolve(steer, monitor, &self.inner.dirs, &self.inner.config)?;
        if r.steering.plan.ops.iter().any(|o| o.when.is_some()) {
            return Err(err("steer: when= conditions are not differentiable and are refused for training"));
        }
        if let Some(seed) = random_control {
            persona::persona::common::randomize_ops(&mut r.steering, seed);
        }
        let path = self.inner.path.clone();
        let context = max_len.max(16);
        let log = py
            .detach(move || -> persona::Result<Vec<Value>> {
                let m = LoadedModel::load(&path, persona::backend::cpu::CpuGemmBackend, context)?;
                persona::backend::cpu::on_pool(|| {
                    let opts = persona::train::data::DataOptions { max_len, label: None };
                    let data = persona::train::data::parse_rows(&text, Path::new("<rows>"), &m, &opts)?;
                    let mut st = r.steering;
                    let monitors = std::mem::take(&mut st.probes);
                    let steering = (!st.plan.ops.is_empty()).then_some(st);
                    let lora =
                        LoraConfig { r: lora_rank, alpha: lora_alpha, use_rslora: true, targets: Target::ALL.to_vec() };
                    let adapter = init_adapter(lora.clone(), &m.engine.config, seed);
                    let mut o = TrainOptions::new(lora);
                    (o.lr, o.steps, o.epochs, o.batch, o.seed) = (lr, steps, epochs, batch, seed);
                    let mut trainer = Trainer::new(&m.engine, o, adapter, data, vec![], steering, monitors)?;
                    let mut log = vec![];
                    trainer.run(&mut |s| {
                        log.push(s.to_json());
                        true
                    })?;
                    let base = path.to_string_lossy().to_string();
                    trainer.adapter.save(&out, &base)?;
                    Ok(log)
                })
            })
            .map_err(err)?;
        json_to_py(py, &Value::Array(log))
    }

    fn __repr__(&self) -> String {
        format!(
            "persona.Model({}, backend={:?}, n_layers={}, hidden={})",
            self.inner.path.display(),
            self.inner.backend,
            self.inner.config.n_layers,
            self.inner.config.hidden
        )
    }
}
