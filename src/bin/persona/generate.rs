//! `persona generate`, and the sampling and steering flags and output lines `persona chat` shares.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use persona::backend::Backend;
use persona::engine::generate::{Finish, GenOutput, GenRequest};
use persona::engine::loaded::TextStream;
use persona::engine::sampler::SamplingParams;
use persona::model::Message;
use persona::steer::spec::{locate_vector, resolve, MonitorSpec, SteerSpec, VectorRef};
use persona::steer::Probe;
use persona::LoadedModel;
use serde_json::json;

use super::{vector_dirs, ModelArgs, ModelTask};

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample from the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn request(&self, prompt_ids: Vec<u32>, top_logits: usize) -> Result<GenRequest> {
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        let sampling =
            SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed };
        sampling.validate()?;
        Ok(GenRequest {
            sampling,
            ignore_eos: self.ignore_eos,
            top_logits,
            ..GenRequest::greedy(prompt_ids, self.max_tokens)
        })
    }
}

/// `--steer`, `--monitor` and `--vectors`, shared by `persona generate` and `persona chat`.
#[derive(Args, Clone, Debug)]
pub struct SteeringArgs {
    /// Steer: `vector=PATH|NAME[,layer=12],coeff=4[,op=add|ablate|clamp|center][,positions=all|prompt|response][,when=NAME:gt:3.5]`
    /// (also `layers=10-14`, `layers=all`; without layer= the vector's persona.layer; `when=NAME[@L]:gt:τ` or
    /// `:lt:τ` steers only tokens whose projection onto monitor NAME, or `self`, passes; `op=center` sets the
    /// projection to the vector's baseline — ordinary text does not sit at 0, so `op=ablate` is not neutral —
    /// and `origin=baseline` measures clamp targets and when= thresholds from it); repeat for several ops.
    #[arg(long = "steer", value_name = "SPEC")]
    pub steer: Vec<String>,
    /// Monitor: `vector=PATH|NAME[,layers=all|L|A-B][,name=NAME]` — per-token projections onto the vector
    /// (layers default to the vector's persona.layer, else all).
    #[arg(long = "monitor", value_name = "SPEC")]
    pub monitor: Vec<String>,
    /// Folder searched first for `vector=NAME` (then vectors/<model name>/, e.g. the shipped
    /// vectors/smollm2-135m-instruct/ for the default model).
    #[arg(long, value_name = "DIR")]
    pub vectors: Option<PathBuf>,
}

impl SteeringArgs {
    /// The folders `vector=NAME` is looked up in for the model at `model`.
    pub fn dirs(&self, model: &Path) -> Vec<PathBuf> {
        vector_dirs(self.vectors.as_deref(), model)
    }
}

#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples (default model, shipped vectors):
  persona generate -p \"How should I treat people who annoy me?\" --steer vector=evil,coeff=-2 --monitor vector=evil
  persona generate -p \"Tell me a joke.\" --monitor vector=evil --steer vector=evil,coeff=-4,when=evil:gt:-15
  persona generate --json --prompt-ids 1,2,3 --model DIR --steer vector=v.safetensors,layer=2,coeff=1.5")]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (the template's default when absent).
    #[arg(long)]
    pub system: Option<String>,
    /// User message; repeat for a batch of prompts generated together.
    #[arg(long, short = 'p', required_unless_present = "prompt_ids", conflicts_with = "prompt_ids")]
    pub prompt: Vec<String>,
    /// Comma-separated token ids (e.g. 1,2,3) instead of text; repeat for a batch.
    #[arg(long)]
    pub prompt_ids: Vec<String>,
    /// Send the prompt text as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Report the K highest logits behind every generated token (with --json).
    #[arg(long, default_value_t = 0)]
    pub top_logits: usize,
    #[command(flatten)]
    pub steering: SteeringArgs,
    /// Print one JSON object per prompt instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u32>().with_context(|| format!("--prompt-ids: `{x}` is not a token id")))
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--prompt-ids: no token ids in `{s}`");
    }
    Ok(ids)
}

fn prompt_ids<B: Backend>(m: &LoadedModel<B>, a: &GenerateArgs) -> Result<Vec<Vec<u32>>> {
    if !a.prompt_ids.is_empty() {
        return a.prompt_ids.iter().map(|s| parse_ids(s)).collect();
    }
    a.prompt
        .iter()
        .map(|p| {
            if a.raw {
                return Ok(m.encode(p, true)?);
            }
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::system(s.clone()));
            }
            msgs.push(Message::user(p.clone()));
            Ok(m.chat_prompt_ids(&msgs)?)
        })
        .collect()
}

/// The file a spec's vector names (values given inline stay as they are).
fn locate(v: &VectorRef, dirs: &[PathBuf]) -> persona::Result<VectorRef> {
    Ok(match v.path() {
        Some(p) => VectorRef::Name(locate_vector(p, dirs)?.to_string_lossy().to_string()),
        None => v.clone(),
    })
}

/// Parse `--steer` / `--monitor` specs and find the file each `vector=` names in `dirs`.
pub fn parse_specs(
    steer: &[String],
    monitor: &[String],
    dirs: &[PathBuf],
) -> Result<(Vec<SteerSpec>, Vec<MonitorSpec>)> {
    let mut st = vec![];
    for s in steer {
        let mut p = SteerSpec::parse(s)?;
        p.vector = locate(&p.vector, dirs).with_context(|| format!("--steer `{s}`"))?;
        st.push(p);
    }
    let mut mo = vec![];
    for s in monitor {
        let mut p = MonitorSpec::parse(s)?;
        p.vector = locate(&p.vector, dirs).with_context(|| format!("--monitor `{s}`"))?;
        mo.push(p);
    }
    Ok((st, mo))
}

fn timing(o: &GenOutput, batch: usize, prompt_tokens: usize, generated: usize) -> serde_json::Value {
    let decode_tokens = generated.saturating_sub(batch);
    json!({
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "prefill_s": o.prefill_s,
        "decode_s": o.decode_s,
        "prefill_tokens_per_s": prompt_tokens as f64 / o.prefill_s.max(1e-9),
        "decode_tokens_per_s": if o.decode_s > 0.0 { decode_tokens as f64 / o.decode_s } else { 0.0 },
    })
}

impl ModelTask for GenerateArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        generate(self, m)
    }
}

fn generate<B: Backend>(a: GenerateArgs, m: LoadedModel<B>) -> Result<()> {
    let prompts = prompt_ids(&m, &a)?;
    let (steer, monitor) = parse_specs(&a.steering.steer, &a.steering.monitor, &a.steering.dirs(&m.path))?;
    let steering = if steer.is_empty() && monitor.is_empty() {
        None
    } else {
        let mut warnings = vec![];
        let st = resolve(&steer, &monitor, &m.engine.config, &mut warnings)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        Some(Arc::new(st))
    };
    let reqs: Vec<GenRequest> = prompts
        .into_iter()
        .map(|p| Ok(GenRequest { steering: steering.clone(), ..a.sampling.request(p, a.top_logits)? }))
        .collect::<Result<_>>()?;
    let probes = steering.as_ref().map(|s| s.probes.clone()).unwrap_or_default();
    let stream = !a.json && reqs.len() == 1 && m.tokenizer.is_some();
    let mut ts = TextStream::default();
    let mut stdout = std::io::stdout();
    // The end-of-sequence token that stops generation is not part of the text (it shows as
    // `"finish": "eos"`); with --ignore-eos every token is text.
    let eos = &m.engine.config.eos_ids;
    let stops = |id: u32| !a.sampling.ignore_eos && eos.contains(&id);
    let outs = m.engine.generate(&reqs, &mut |_, step| {
        if stream && !stops(step.id) {
            if let Some(tok) = &m.tokenizer {
                let _ = write!(stdout, "{}", ts.push(tok, step.id));
                let _ = stdout.flush();
            }
        }
    })?;
    let prompt_tokens: usize = reqs.iter().map(|r| r.prompt_ids.len()).sum();
    let generated: usize = outs.iter().map(|o| o.steps.len()).sum();
    let t = timing(&outs[0], reqs.len(), prompt_tokens, generated);
    for o in &outs {
        let ids = o.ids();
        let text_ids = o.text_ids(eos, a.sampling.ignore_eos);
        let text = if m.tokenizer.is_some() { Some(m.decode(&text_ids)?) } else { None };
        if a.json {
            let steps: Vec<serde_json::Value> = o
                .steps
                .iter()
                .map(|s| {
                    if a.top_logits > 0 {
                        json!({"id": s.id, "top": s.top.iter().map(|(i, l)| json!([i, l])).collect::<Vec<_>>()})
                    } else {
                        json!({"id": s.id})
                    }
                })
                .collect();
            let mut v = json!({
                "prompt_ids": o.prompt_ids, "ids": ids, "text": text, "steps": steps,
                "finish": match o.finish { Finish::Eos => "eos", Finish::Length => "length", Finish::Stopped => "stopped" },
                "timing": t,
            });
            if !probes.is_empty() {
                v["projections"] = projections_json(&probes, o, |k| o.projections[k].clone().into());
                v["scores"] = projections_json(&probes, o, |k| {
                    json!({"last_prompt": o.last_prompt_projection(k), "prompt_mean": o.prompt_mean_projection(k),
                               "response_mean": o.response_mean_projection(k)})
                });
            }
            if !o.receipts.is_empty() {
                v["receipts"] = json!(o.receipts);
            }
            println!("{}", serde_json::to_string(&v)?);
        } else {
            if stream {
                println!();
            } else {
                match text {
                    Some(s) => println!("{s}\n"),
                    None => println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")),
                }
            }
            for r in &o.receipts {
                eprintln!("[{}]", receipt_line(r));
            }
            for (k, p) in probes.iter().enumerate() {
                println!("[{}]", monitor_line(p, o, k));
            }
        }
    }
    if !a.json {
        eprintln!(
            "[{} prompt tokens: {:.1} tok/s prefill; {} generated: {:.1} tok/s decode]",
            prompt_tokens,
            t["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            generated,
            t["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// Probe `k`'s scores in `o`: `monitor evil layer 18: last prompt token +1.234, response mean -0.567`.
pub fn monitor_line(p: &Probe, o: &GenOutput, k: usize) -> String {
    format!(
        "monitor {} layer {}: last prompt token {:+.3}, response mean {:+.3}",
        p.name,
        p.layer,
        o.last_prompt_projection(k),
        o.response_mean_projection(k)
    )
}

/// What a steering op does, without its counts: `steer evil add 4 at layer 12 (positions all)`.
pub fn op_description(r: &persona::steer::Receipt) -> String {
    let layers: Vec<String> = r.layers.iter().map(|l| l.to_string()).collect();
    format!(
        "steer {} {} {} at layer{} {} (positions {})",
        r.vector,
        r.op,
        r.coeff,
        if r.layers.len() == 1 { "" } else { "s" },
        layers.join(","),
        r.positions,
    )
}

/// One receipt as a line: `steer evil add 4 at layer 12 (positions all): 57 tokens`.
pub fn receipt_line(r: &persona::steer::Receipt) -> String {
    let mut s = format!("{}: {} tokens", op_description(r), r.tokens);
    if let (Some(f), Some(w)) = (r.fired, &r.when) {
        s += &format!(", when {w} fired {f} times");
    }
    if r.tokens == 0 {
        s += " — this op touched no token";
    }
    s
}

/// `{"<probe>": {"<layer>": f(k)}}` over the request's probes.
fn projections_json(probes: &[Probe], _o: &GenOutput, f: impl Fn(usize) -> serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (k, p) in probes.iter().enumerate() {
        let e = out.entry(p.name.clone()).or_insert_with(|| json!({}));
        e[p.layer.to_string()] = f(k);
    }
    serde_json::Value::Object(out)
}
