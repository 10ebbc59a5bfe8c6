//! A throw-away local cluster: a controller and one memory node started as child
//! processes of the harness on 127.0.0.1.
//!
//! Each child prints exactly one line `listening <addr>` on stdout once it accepts
//! connections. The children are killed when the [`LocalCluster`] is dropped, which
//! covers normal exit and every error path. On Ctrl-C the terminal sends SIGINT to the
//! whole foreground process group, and the children are in the harness's group, so they
//! stop together with it.

use super::args::BenchTransport;
use super::error::BenchError;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long a child may take to print its `listening` line.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of a child's stderr kept for error messages.
const STDERR_TAIL: usize = 20;

/// A child process that is killed (and reaped) on drop.
pub(crate) struct ChildGuard {
    what: &'static str,
    child: Child,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildGuard {
    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the child wrote to stderr.
    fn tail(&self) -> String {
        let tail = self.stderr_tail.lock();
        if tail.is_empty() {
            "(nothing)".to_string()
        } else {
            tail.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }

    /// Whether the child is still running.
    pub(crate) fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(_)) | Err(_) => Err(BenchError::ChildExited {
                what: self.what,
                stderr: self.tail(),
            }),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The child may exit between the check and the kill; both outcomes are fine.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A controller and one memory node running as children of this process.
pub(crate) struct LocalCluster {
    // Dropped in declaration order: the memory node stops before the controller.
    memnode: ChildGuard,
    controller: ChildGuard,
    controller_addr: String,
}

impl LocalCluster {
    /// Starts `bin controller` and `bin memnode` on 127.0.0.1 with ephemeral ports.
    pub(crate) fn start(
        bin: &Path,
        transport: BenchTransport,
        capacity: u64,
        block_size: u64,
    ) -> Result<Self, BenchError> {
        let (controller, controller_addr) = spawn_ready(
            "controller",
            bin,
            &["controller", "--listen", "127.0.0.1:0", "--exit-with-stdin"],
            READY_TIMEOUT,
        )?;
        let capacity = capacity.to_string();
        let block_size = block_size.to_string();
        let (memnode, _data_addr) = spawn_ready(
            "memory node",
            bin,
            &[
                "memnode",
                "--controller",
                &controller_addr,
                "--listen",
                "127.0.0.1:0",
                "--capacity",
                &capacity,
                "--block-size",
                &block_size,
                "--transport",
                transport.as_str(),
                "--exit-with-stdin",
            ],
            READY_TIMEOUT,
        )?;
        Ok(Self {
            memnode,
            controller,
            controller_addr,
        })
    }

    /// The controller's `host:port`.
    pub(crate) fn controller_addr(&self) -> &str {
        &self.controller_addr
    }

    /// The memory node's process id.
    pub(crate) fn memnode_pid(&self) -> u32 {
        self.memnode.pid()
    }

    /// The last lines the memory node wrote to stderr.
    pub(crate) fn memnode_stderr(&self) -> String {
        self.memnode.tail()
    }

    /// Fails with the child's stderr when either child has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), BenchError> {
        self.controller.check_alive()?;
        self.memnode.check_alive()
    }
}

/// The default farpool binary: this executable.
pub(crate) fn default_bin() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(|source| BenchError::Spawn {
        what: "controller",
        program: PathBuf::from("farpool"),
        source,
    })
}

/// Spawns `bin args` and waits up to `timeout` for its `listening <addr>` line.
pub(crate) fn spawn_ready(
    what: &'static str,
    bin: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<(ChildGuard, String), BenchError> {
    let mut child = Command::new(bin)
        .args(args)
        // Never written: the pipe closes when this process ends, however it ends, and
        // children started with `--exit-with-stdin` then shut down instead of lingering.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what,
            program: bin.to_path_buf(),
            source,
        })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let guard = ChildGuard {
        what,
        child,
        stderr_tail: Arc::clone(&stderr_tail),
    };
    let stderr_done = stderr.map(|e| keep_tail(e, stderr_tail));

    let (tx, rx) = mpsc::channel();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(first) = lines.next() {
                let _ = tx.send(first.unwrap_or_else(|e| format!("<unreadable output: {e}>")));
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
    }
    let line = match rx.recv_timeout(timeout) {
        Ok(line) => line,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(BenchError::StartTimeout {
                what,
                secs: timeout.as_secs(),
                stderr: guard.tail(),
            })
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The child closed stdout: it exited. Let its stderr reach the tail first.
            if let Some(done) = stderr_done {
                let _ = done.recv_timeout(Duration::from_secs(1));
            }
            return Err(BenchError::ChildExited {
                what,
                stderr: guard.tail(),
            });
        }
    };
    let addr = parse_ready_line(&line).ok_or_else(|| BenchError::BadReadyLine {
        what,
        line: line.clone(),
    })?;
    Ok((guard, addr))
}

/// `listening 127.0.0.1:4000` → `127.0.0.1:4000`.
pub(crate) fn parse_ready_line(line: &str) -> Option<String> {
    let addr = line.trim().strip_prefix("listening ")?.trim();
    (!addr.is_empty() && !addr.contains(char::is_whitespace)).then(|| addr.to_string())
}

/// Drains `stderr` on a thread, keeping the last lines; the receiver fires at EOF.
fn keep_tail(stderr: ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.by_ref().take(64 * 1024).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    let mut t = tail.lock();
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        }
        let _ = tx.send(());
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_lines() {
        assert_eq!(
            parse_ready_line("listening 127.0.0.1:4000\n").as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(parse_ready_line("listening "), None);
        assert_eq!(parse_ready_line("ready 1.2.3.4:5"), None);
        assert_eq!(parse_ready_line("listening a b"), None);
    }

    #[cfg(unix)]
    #[test]
    fn reads_the_ready_line_and_kills_on_drop() {
        let sh = Path::new("/bin/sh");
        let (guard, addr) = spawn_ready(
            "test child",
            sh,
            &["-c", "echo 'listening 127.0.0.1:9'; exec sleep 30"],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(addr, "127.0.0.1:9");
        let pid = guard.pid();
        drop(guard);
        // Killed and reaped: no process (not even a zombie) is left.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[cfg(unix)]
    #[test]
    fn reports_early_exit_with_stderr() {
        let err = spawn_ready(
            "test child",
            Path::new("/bin/sh"),
            &["-c", "echo 'bad flag --capacity' >&2; exit 2"],
            Duration::from_secs(10),
        )
        .err()
        .unwrap();
        let msg = err.to_string();
        assert!(msg.contains("exited before it was ready"), "{msg}");
        assert!(msg.contains("bad flag --capacity"), "{msg}");
    }

    #[cfg(unix)]
    #[test]
    fn rejects_unexpected_first_lines() {
        let err = spawn_ready(
            "test child",
            Path::new("/bin/sh"),
            &["-c", "echo hello; exec sleep 30"],
            Duration::from_secs(10),
        )
        .err()
        .unwrap();
        assert!(matches!(err, BenchError::BadReadyLine { .. }));
    }

    #[test]
    fn missing_binaries_say_what_to_do() {
        let err = spawn_ready(
            "controller",
            Path::new("/nonexistent/farpool"),
            &[],
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("--farpool-bin"));
    }
}
