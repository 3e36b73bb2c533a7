//! `persona chat`: a streaming conversation, steered and monitored. Slash commands change the
//! steering, the monitors and the system prompt between turns; after each reply a line per
//! monitor (last prompt token and response mean projection) and the steering receipts (tokens
//! each op touched, how often its condition fired). Ctrl-C during a reply stops that reply only.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use persona::backend::Backend;
use persona::engine::generate::{Finish, GenRequest};
use persona::engine::loaded::TextStream;
use persona::model::Message;
use persona::steer::spec::{resolve, MonitorSpec, SteerSpec};
use persona::steer::SeqSteering;
use persona::LoadedModel;

use super::generate::{monitor_line, op_description, parse_specs, receipt_line, SamplingArgs, SteeringArgs};
use super::{ModelArgs, ModelTask};

#[derive(Args, Debug, Clone)]
#[command(after_help = "Commands during the chat (/help lists them):
  /steer SPEC        add a steering op (same SPEC as --steer); /steer lists them; /steer clear
  /coeff NAME X      set the coefficient of the ops on vector NAME (or op number NAME)
  /monitor SPEC      add a monitor (same SPEC as --monitor); /monitor lists them; /monitor clear
  /system TEXT       set the system prompt and start a new conversation; /system clear
  /reset             start a new conversation (steering and monitors stay)
  /exit              leave (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C during a reply stops it ([stopped]; the partial reply stays in the conversation).

Examples (default model, shipped vectors):
  persona chat --steer vector=evil,coeff=4 --monitor vector=evil
  persona chat --monitor vector=evil --monitor vector=sycophantic --system \"You are a terse assistant.\"
  persona chat --steer vector=evil,coeff=-4,when=evil:gt:-15 --monitor vector=evil --temperature 0.7
  (then, in the chat: /coeff evil 0   /steer vector=humorous,coeff=3   /monitor clear)")]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (the template's default when absent); `/system TEXT` changes it.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub steering: SteeringArgs,
}

impl ModelTask for ChatArgs {
    fn run<B: Backend>(self, m: LoadedModel<B>) -> Result<()> {
        chat(self, m)
    }
}

const HELP: &str = "commands:
  /help              this list
  /steer SPEC        add a steering op: vector=NAME|PATH[,layer=L],coeff=X[,op=add|ablate|clamp]
                     [,positions=all|prompt|response][,when=MONITOR:gt:T]
  /steer             list the steering ops with their numbers
  /steer clear       remove every steering op
  /coeff NAME X      set the coefficient of the ops on vector NAME (or op number NAME)
  /monitor SPEC      add a monitor: vector=NAME|PATH[,layers=all|L|A-B][,name=NAME]
  /monitor           list the monitors
  /monitor clear     remove every monitor
  /system TEXT       set the system prompt and start a new conversation
  /system            show the system prompt; /system clear goes back to the template's default
  /reset             start a new conversation (steering and monitors stay)
  /exit              leave (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C during a reply stops it; a line starting with // is sent to the model with one / removed.";

const COMMANDS: &str = "/help, /steer, /coeff, /monitor, /system, /reset, /exit";

/// What Ctrl-C means now: stop the reply in progress, or (at the prompt) a hint, then leave.
struct Interrupt {
    generating: AtomicBool,
    /// The stop flag of the reply in progress ([`GenRequest::stop`]).
    stop: Arc<AtomicBool>,
    /// Ctrl-C was pressed at the prompt and no line has been entered since.
    at_prompt: AtomicBool,
}

impl Interrupt {
    fn install() -> Result<Arc<Self>> {
        let i = Arc::new(Interrupt {
            generating: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            at_prompt: AtomicBool::new(false),
        });
        let h = i.clone();
        ctrlc::set_handler(move || {
            if h.generating.load(Ordering::SeqCst) {
                h.stop.store(true, Ordering::SeqCst);
            } else if h.at_prompt.swap(true, Ordering::SeqCst) {
                eprintln!();
                std::process::exit(130);
            } else {
                // On a terminal the line typed so far is already discarded by the tty driver.
                eprint!("\n(Ctrl-C again to leave, or /exit, or Ctrl-D)\n> ");
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(i)
    }
}

/// The conversation and what steers and monitors it.
struct Session<'a, B: Backend> {
    m: &'a LoadedModel<B>,
    sampling: SamplingArgs,
    dirs: Vec<PathBuf>,
    steer: Vec<SteerSpec>,
    monitor: Vec<MonitorSpec>,
    /// `steer` and `monitor` resolved against the model (None: neither has anything).
    steering: Option<Arc<SeqSteering>>,
    system: Option<String>,
    history: Vec<Message>,
}

/// Resolve specs against the model; warnings go to stderr.
fn resolve_all<B: Backend>(
    m: &LoadedModel<B>,
    steer: &[SteerSpec],
    monitor: &[MonitorSpec],
) -> Result<Option<Arc<SeqSteering>>> {
    if steer.is_empty() && monitor.is_empty() {
        return Ok(None);
    }
    let mut warnings = vec![];
    let st = resolve(steer, monitor, &m.engine.config, &mut warnings)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(Some(Arc::new(st)))
}

impl<B: Backend> Session<'_, B> {
    /// Take `steer` and `monitor` as the new state if they resolve; otherwise keep the old one.
    fn set(&mut self, steer: Vec<SteerSpec>, monitor: Vec<MonitorSpec>) -> Result<()> {
        self.steering = resolve_all(self.m, &steer, &monitor)?;
        self.steer = steer;
        self.monitor = monitor;
        Ok(())
    }

    fn new_conversation(&mut self) {
        self.history = self.system.iter().map(|s| Message::system(s.clone())).collect();
    }

    /// `[k] steer evil add 4 at layer 18 (positions all)` per op.
    fn list_ops(&self) {
        let receipts = self.steering.as_ref().map(|s| s.receipts(&[])).unwrap_or_default();
        if receipts.is_empty() {
            eprintln!("no steering ops (add one with /steer SPEC)");
        }
        for (k, (r, s)) in receipts.iter().zip(&self.steer).enumerate() {
            let mut line = format!("[{k}] {}", op_description(r));
            if let Some(w) = &r.when {
                line += &format!(", when {w}");
            }
            if s.relative {
                line += &format!(" (scale=relative, coeff {} of |h_L|)", s.coeff);
            }
            eprintln!("{line}");
        }
    }

    fn list_monitors(&self) {
        if self.monitor.is_empty() {
            eprintln!("no monitors (add one with /monitor SPEC)");
        }
        let probes = self.steering.as_ref().map(|s| &s.probes[..]).unwrap_or_default();
        for (k, s) in self.monitor.iter().enumerate() {
            let layers: Vec<String> =
                probes.iter().filter(|p| p.name == s.name()).map(|p| p.layer.to_string()).collect();
            eprintln!(
                "[{k}] monitor {} ({}) at layer{} {}",
                s.name(),
                s.vector,
                if layers.len() == 1 { "" } else { "s" },
                layers.join(",")
            );
        }
    }

    /// `/coeff NAME X`: the ops whose vector is NAME (file stem, or the vector's recorded name), or
    /// op number NAME.
    fn coeff(&mut self, args: &str) -> Result<()> {
        let mut it = args.split_whitespace();
        let (Some(name), Some(x), None) = (it.next(), it.next(), it.next()) else {
            bail!("usage: /coeff NAME X (e.g. /coeff evil -2)");
        };
        let x: f32 = match x.parse::<f32>() {
            Ok(v) if v.is_finite() => v,
            _ => bail!("/coeff: `{x}` is not a finite number"),
        };
        let names: Vec<String> = match &self.steering {
            Some(s) => s.receipts(&[]).into_iter().map(|r| r.vector).collect(),
            None => vec![],
        };
        let hits: Vec<usize> = (0..self.steer.len())
            .filter(|&k| {
                self.steer[k].vector.label() == name
                    || names.get(k).is_some_and(|n| n == name)
                    || name.parse::<usize>().is_ok_and(|i| i == k)
            })
            .collect();
        if hits.is_empty() {
            let have: Vec<String> = self.steer.iter().map(|s| s.vector.label()).collect();
            bail!(
                "/coeff: no steering op on vector `{name}` ({}); add one with /steer vector={name},coeff={x}",
                if have.is_empty() {
                    "there are no steering ops".to_string()
                } else {
                    format!("ops on: {}", have.join(", "))
                }
            );
        }
        let mut steer = self.steer.clone();
        for &k in &hits {
            steer[k].coeff = x;
        }
        let monitor = self.monitor.clone();
        self.set(steer, monitor)?;
        if hits.iter().any(|&k| self.steer[k].kind == persona::steer::SteerKind::Ablate) {
            eprintln!("note: ablate ignores its coefficient");
        }
        self.list_ops();
        Ok(())
    }

    /// Run a slash command (`line` starts with `/`). Ok(false): leave the chat.
    fn command(&mut self, line: &str) -> Result<bool> {
        let (cmd, rest) = match line.split_once(char::is_whitespace) {
            Some((c, r)) => (c, r.trim()),
            None => (line, ""),
        };
        match cmd {
            "/exit" | "/quit" => return Ok(false),
            "/help" => eprintln!("{HELP}"),
            "/reset" => {
                self.new_conversation();
                eprintln!("new conversation (steering, monitors and system prompt kept)");
            }
            "/steer" => match rest {
                "" => self.list_ops(),
                "clear" => {
                    let monitor = self.monitor.clone();
                    self.set(vec![], monitor)?;
                    eprintln!("steering cleared");
                }
                spec => {
                    let (new, _) = parse_specs(&[spec.to_string()], &[], &self.dirs)?;
                    let (mut steer, monitor) = (self.steer.clone(), self.monitor.clone());
                    steer.extend(new);
                    self.set(steer, monitor)?;
                    self.list_ops();
                }
            },
            "/coeff" => self.coeff(rest)?,
            "/monitor" => match rest {
                "" => self.list_monitors(),
                "clear" => {
                    let steer = self.steer.clone();
                    self.set(steer, vec![]).context("the steering ops need their monitors (/steer clear first)")?;
                    eprintln!("monitors cleared");
                }
                spec => {
                    let (_, new) = parse_specs(&[], &[spec.to_string()], &self.dirs)?;
                    let (steer, mut monitor) = (self.steer.clone(), self.monitor.clone());
                    monitor.extend(new);
                    self.set(steer, monitor)?;
                    self.list_monitors();
                }
            },
            "/system" => match rest {
                "" => match &self.system {
                    Some(s) => eprintln!("system prompt: {s}"),
                    None => eprintln!("no system prompt (the template's default)"),
                },
                "clear" => {
                    self.system = None;
                    self.new_conversation();
                    eprintln!("system prompt cleared (the template's default); new conversation");
                }
                text => {
                    self.system = Some(text.to_string());
                    self.new_conversation();
                    eprintln!("system prompt set; new conversation");
                }
            },
            other => bail!("unknown command `{other}` (commands: {COMMANDS}; /help explains them)"),
        }
        Ok(true)
    }

    /// One turn: the reply streamed to stdout, then the monitor lines and steering receipts.
    fn turn(&mut self, text: &str, intr: &Interrupt) -> Result<()> {
        let m = self.m;
        let tok = m.tokenizer.as_ref().context("no tokenizer")?;
        self.history.push(Message::user(text));
        let ids = match m.chat_prompt_ids(&self.history) {
            Ok(ids) => ids,
            Err(e) => {
                self.history.pop();
                return Err(e.into());
            }
        };
        // Prompt + reply + one position must fit the context.
        let room = m.engine.max_context.saturating_sub(ids.len() + 1);
        if room == 0 {
            self.history.pop();
            bail!(
                "the conversation ({} tokens) fills the context of {} tokens: /reset, or a larger --context",
                ids.len(),
                m.engine.max_context
            );
        }
        let mut sampling = self.sampling.clone();
        sampling.max_tokens = sampling.max_tokens.min(room);
        let req =
            GenRequest { steering: self.steering.clone(), stop: Some(intr.stop.clone()), ..sampling.request(ids, 0)? };
        let eos = &m.engine.config.eos_ids;
        let mut ts = TextStream::default();
        let mut stdout = std::io::stdout();
        intr.stop.store(false, Ordering::SeqCst);
        intr.generating.store(true, Ordering::SeqCst);
        let out = m.engine.generate(&[req], &mut |_, step| {
            if !eos.contains(&step.id) {
                let _ = write!(stdout, "{}", ts.push(tok, step.id));
                let _ = stdout.flush();
            }
        });
        intr.generating.store(false, Ordering::SeqCst);
        let o = match out {
            Ok(mut o) => o.remove(0),
            Err(e) => {
                println!();
                self.history.pop();
                return Err(e.into());
            }
        };
        println!();
        if o.finish == Finish::Stopped {
            eprintln!("[stopped]");
        }
        let ids: Vec<u32> = o.ids().into_iter().filter(|i| !eos.contains(i)).collect();
        // A stopped reply stays in the conversation as far as it got.
        self.history.push(Message::assistant(m.decode(&ids)?));
        for r in &o.receipts {
            eprintln!("[{}]", receipt_line(r));
        }
        if let Some(st) = &self.steering {
            for (k, p) in st.probes.iter().enumerate() {
                println!("[{}]", monitor_line(p, &o, k));
            }
        }
        Ok(())
    }
}

/// Read a line per user turn until EOF or `/exit`.
fn chat<B: Backend>(a: ChatArgs, m: LoadedModel<B>) -> Result<()> {
    m.tokenizer.as_ref().context("this model has no tokenizer; use `persona generate --prompt-ids`")?;
    a.sampling.request(vec![0], 0)?; // check the sampling flags before the first turn
    let dirs = a.steering.dirs(&m.path);
    let (steer, monitor) = parse_specs(&a.steering.steer, &a.steering.monitor, &dirs)?;
    let steering = resolve_all(&m, &steer, &monitor)?;
    let mut s = Session {
        m: &m,
        sampling: a.sampling.clone(),
        dirs,
        steer,
        monitor,
        steering,
        system: a.system.clone(),
        history: vec![],
    };
    s.new_conversation();
    let intr = Interrupt::install()?;
    eprintln!("persona chat: type a message; /help lists the commands, /exit or Ctrl-D ends.");
    if !s.steer.is_empty() {
        s.list_ops();
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            break;
        }
        intr.at_prompt.store(false, Ordering::SeqCst);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let r = if let Some(msg) = line.strip_prefix("//") {
            s.turn(&format!("/{msg}"), &intr)
        } else if line.starts_with('/') {
            match s.command(line) {
                Ok(true) => Ok(()),
                Ok(false) => break,
                Err(e) => Err(e),
            }
        } else {
            s.turn(line, &intr)
        };
        // A bad spec or a failed turn is reported; the chat goes on.
        if let Err(e) = r {
            eprintln!("error: {e:#}");
        }
    }
    Ok(())
}
