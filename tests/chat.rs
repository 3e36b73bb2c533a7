//! `persona chat` driven through a pseudo-terminal, as a person types it (issue 20 item 4):
//! steered turns with their receipts, slash commands, and Ctrl-C that stops a reply but not the chat.

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest any one expected output may take (a reply of a few tokens on the CPU backend, or
/// a stop after Ctrl-C, takes seconds).
const TIMEOUT: Duration = Duration::from_secs(120);

/// `persona ARGS` with a pseudo-terminal as its stdin, stdout, stderr and controlling terminal:
/// what is written to the master is typed (Ctrl-C, `\x03`, raises SIGINT in the child as a
/// terminal would), and everything it prints is collected, `\r` removed.
struct Terminal {
    master: std::fs::File,
    child: Child,
    out: Arc<Mutex<String>>,
    /// How much of `out` the expectations have consumed.
    seen: usize,
}

impl Terminal {
    fn spawn(args: &[&str]) -> Terminal {
        // SAFETY: plain libc calls on a descriptor this function owns; `name` is NUL-terminated by ptsname_r.
        let (master, slave) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            assert!(libc::grantpt(fd) == 0 && libc::unlockpt(fd) == 0, "{}", std::io::Error::last_os_error());
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
            let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_str().unwrap().to_string();
            (std::fs::File::from_raw_fd(fd), path)
        };
        let child = {
            use std::os::unix::fs::OpenOptionsExt;
            let tty =
                std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&slave).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
            cmd.args(args).stdin(tty.try_clone().unwrap()).stdout(tty.try_clone().unwrap()).stderr(tty);
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    // A session of its own with the terminal as its controlling terminal, so the
                    // terminal's Ctrl-C reaches it (and only it).
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn().unwrap()
            // `cmd` and with it the last copy of the terminal's descriptor close here, so the
            // master reads EIO once the child has exited.
        };
        let out = Arc::new(Mutex::new(String::new()));
        let (mut reader, sink) = (master.try_clone().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
            }
        });
        Terminal { master, child, out, seen: 0 }
    }

    fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Wait until `ok(unread output)` gives a length to consume; panic with the transcript after
    /// [`TIMEOUT`].
    fn wait(&mut self, what: &str, ok: impl Fn(&str) -> Option<usize>) -> String {
        let t0 = Instant::now();
        loop {
            let out = self.out.lock().unwrap().clone();
            let unread = &out[self.seen..];
            if let Some(n) = ok(unread) {
                self.seen += n;
                return unread[..n].to_string();
            }
            if t0.elapsed() > TIMEOUT
                || self.child.try_wait().unwrap().is_some() && t0.elapsed() > Duration::from_secs(2)
            {
                panic!("waiting for {what}; the chat printed:\n{out}\n--- (unread from here) ---\n{unread}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything up to and including `needle`.
    fn expect(&mut self, needle: &str) -> String {
        self.wait(&format!("{needle:?}"), |s| s.find(needle).map(|i| i + needle.len()))
    }

    /// Everything up to the next prompt (`> ` at the start of a line).
    fn prompt(&mut self) -> String {
        self.expect("\n> ")
    }

    /// Type a line; returns once its echo is back, so what follows is the chat's answer.
    fn line(&mut self, text: &str) {
        self.send(&format!("{text}\n"));
        self.expect(&format!("{text}\n"));
    }

    /// At least `n` more bytes of output (a reply streaming).
    fn more(&mut self, n: usize) -> String {
        self.wait(&format!("{n} bytes of reply"), |s| (s.len() >= n).then_some(s.len()))
    }

    fn exit_code(&mut self) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                return s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
            }
            if t0.elapsed() > TIMEOUT {
                panic!("the chat did not exit:\n{}", self.out.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A steered chat: the receipt line after each reply follows `/coeff`; `/help` lists the
/// commands; an unknown `/word` or a bad spec is an error, nothing is generated, and the chat
/// goes on; `/exit` ends it.
#[test]
fn chat_steers_and_takes_commands() {
    let Some(model) = required_default_model() else { return };
    let base = ["chat", "--backend", "cpu", "--model", s(&model), "--max-tokens", "12"];
    let mut t = Terminal::spawn(&[&base[..], &["--steer", "vector=evil,coeff=4", "--monitor", "vector=evil"]].concat());
    let start = t.prompt();
    assert!(start.contains("/help") && start.contains("[0] steer evil add 4 at layer 18 (positions all)"), "{start}");

    t.line("/help");
    let help = t.prompt();
    for c in [
        "/steer SPEC",
        "/steer clear",
        "/coeff NAME X",
        "/monitor SPEC",
        "/monitor clear",
        "/system TEXT",
        "/reset",
        "/exit",
    ] {
        assert!(help.contains(c), "/help does not list {c}:\n{help}");
    }

    // A steered turn: the reply, then its receipt and the monitor's scores.
    t.line("Hi, who are you?");
    let turn = t.expect("[monitor evil layer 18: last prompt token ");
    let receipt = turn.lines().find(|l| l.starts_with("[steer evil")).unwrap_or_else(|| panic!("no receipt:\n{turn}"));
    assert!(receipt.starts_with("[steer evil add 4 at layer 18 (positions all): "), "{receipt}");
    let tokens: u64 = receipt.split(": ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(tokens > 12, "the op touched the prompt and the reply: {receipt}");
    let scores = t.prompt();
    assert!(scores.contains(", response mean "), "{scores}");

    // /coeff changes the op, and the next receipt shows it.
    t.line("/coeff evil 0");
    let list = t.prompt();
    assert!(list.contains("[0] steer evil add 0 at layer 18"), "{list}");
    t.line("And what do you like?");
    let turn = t.expect("[monitor evil layer 18:");
    assert!(turn.contains("\n[steer evil add 0 at layer 18 (positions all): "), "{turn}");
    t.prompt();

    // Errors, and nothing generated for them.
    for (cmd, err) in [
        ("/foo bar", "unknown command `/foo`"),
        ("/coeff sycophantic 1", "no steering op on vector `sycophantic`"),
        ("/coeff evil x", "`x` is not a finite number"),
        ("/steer vector=evil,coeff=1,op=boost", "unknown op `boost`"),
        ("/steer vector=nope,coeff=1", "vector `nope`"),
        ("/monitor vector=evil,layers=x", "layers `x`"),
    ] {
        t.line(cmd);
        let out = t.prompt();
        assert!(out.starts_with("error: ") && out.contains(err), "{cmd}:\n{out}");
        assert!(!out.contains("[steer") && !out.contains("[monitor"), "{cmd} generated a reply:\n{out}");
    }
    let out = {
        t.line("/foo");
        t.prompt()
    };
    assert!(
        out.contains("/help") && out.contains("/steer") && out.contains("/coeff"),
        "the error lists the commands: {out}"
    );

    // The bad specs added nothing; a good one is op 1; /steer clear leaves none.
    t.line("/steer vector=humorous,coeff=2");
    let list = t.prompt();
    assert!(list.contains("[0] steer evil add 0") && list.contains("[1] steer humorous add 2"), "{list}");
    t.line("/steer clear");
    t.prompt();
    t.line("/steer");
    let list = t.prompt();
    assert!(list.contains("no steering ops"), "{list}");

    t.line("/system You are a pirate.");
    let out = t.prompt();
    assert!(out.contains("new conversation"), "{out}");

    t.line("/exit");
    assert_eq!(t.exit_code(), 0);
}

/// Ctrl-C during a reply stops that reply (`[stopped]`, then its monitor line) and the chat goes
/// on: the next message gets a reply. Ctrl-C at the prompt prints a hint; a second one leaves.
#[test]
fn ctrl_c_stops_the_reply_not_the_chat() {
    let Some(model) = required_default_model() else { return };
    // Replies that would run for thousands of tokens.
    let args = ["chat", "--backend", "cpu", "--model", s(&model), "--max-tokens", "3000", "--ignore-eos"];
    let mut t = Terminal::spawn(&[&args[..], &["--monitor", "vector=evil"]].concat());
    t.prompt();
    for msg in ["Tell me a long story about a dragon.", "What happened next?"] {
        t.line(msg);
        t.more(24);
        t.send("\x03");
        let out = t.expect("[monitor evil layer 18:");
        assert!(out.contains("[stopped]"), "{out}");
        t.prompt();
    }
    t.send("\x03");
    t.expect("Ctrl-C again to leave");
    t.prompt();
    t.send("\x03");
    assert_eq!(t.exit_code(), 130);
}

/// `persona chat --help` lists the slash commands and has examples.
#[test]
fn chat_help_has_commands_and_examples() {
    let (ok, out, err) = persona_cli(&["chat", "--help"]);
    assert!(ok, "{err}");
    for want in ["--steer <SPEC>", "--monitor <SPEC>", "--vectors <DIR>", "/coeff NAME X", "Ctrl-C", "Examples"] {
        assert!(out.contains(want), "no {want}:\n{out}");
    }
    assert!(out.contains("persona chat --steer vector=evil,coeff=4 --monitor vector=evil"), "{out}");
}
