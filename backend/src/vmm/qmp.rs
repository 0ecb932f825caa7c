//! A small asynchronous QMP client: connect and negotiate, run commands
//! (optionally passing a file descriptor with `SCM_RIGHTS`), and wait for
//! events such as `MIGRATION` with a deadline.
//!
//! A libvirt domain's QEMU is reached through libvirt instead
//! ([`Qmp::libvirt`]): its commands pass through libvirtd, with no events,
//! so a migration is followed by polling `query-migrate`.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::{timeout, Instant};

/// Errors talking to QEMU's monitor.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection (has it exited?)")]
    Closed,
    #[error("QMP sent invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("passing a file descriptor to QEMU failed: {0}")]
    SendFd(nix::Error),
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("not possible: {0}")]
    Unsupported(String),
}

/// A negotiated QMP session.
pub struct Qmp {
    transport: Transport,
}

enum Transport {
    /// QEMU's own monitor socket (VMs thaw started).
    Socket(SocketSession),
    /// Commands passed through libvirtd to a libvirt domain's QEMU.
    Libvirt(Arc<super::libvirt::LibvirtDomain>),
}

struct SocketSession {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    line: String,
}

/// How often a migration through libvirt (no events) is polled.
const MIGRATION_POLL: Duration = Duration::from_millis(20);

/// Default deadline for a single QMP command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

impl Qmp {
    /// Connects to `path`, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut session = SocketSession {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            line: String::new(),
        };
        let greeting = timeout(COMMAND_TIMEOUT, session.read_message())
            .await
            .map_err(|_| QmpError::Timeout(COMMAND_TIMEOUT, "the QMP greeting".into()))??;
        if greeting.get("QMP").is_none() {
            log::warn!("unexpected QMP greeting: {greeting}");
        }
        let mut qmp = Qmp {
            transport: Transport::Socket(session),
        };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// A session with a libvirt domain's QEMU through libvirtd
    /// (`virDomainQemuMonitorCommand`: libvirt marks the domain tainted
    /// `custom-monitor`). `stop` and `cont` become libvirt's suspend and
    /// resume, so libvirt's idea of the domain's state stays right.
    pub fn libvirt(domain: Arc<super::libvirt::LibvirtDomain>) -> Qmp {
        Qmp {
            transport: Transport::Libvirt(domain),
        }
    }

    /// Whether commands pass through libvirt (no events, no fd passing
    /// except through [`Qmp::execute_with_fd`]).
    pub fn is_libvirt(&self) -> bool {
        matches!(self.transport, Transport::Libvirt(_))
    }

    /// Runs `command` and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        match &mut self.transport {
            Transport::Socket(s) => s.execute(command, arguments).await,
            Transport::Libvirt(d) => libvirt_call(d, command, arguments, None).await,
        }
    }

    /// Runs `command` with `fd` attached (`SCM_RIGHTS`), as `getfd` and
    /// `add-fd` expect.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        match &mut self.transport {
            Transport::Socket(s) => s.execute_with_fd(command, arguments, fd).await,
            Transport::Libvirt(d) => {
                let owned = fd.try_clone_to_owned()?;
                libvirt_call(d, command, arguments, Some(owned)).await
            }
        }
    }

    /// Waits for an event named `name` whose `data` satisfies `pred`;
    /// earlier queued events are considered first. Not available through
    /// libvirt.
    pub async fn wait_event(
        &mut self,
        name: &str,
        within: Duration,
        pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        match &mut self.transport {
            Transport::Socket(s) => s.wait_event(name, within, pred).await,
            Transport::Libvirt(_) => Err(QmpError::Unsupported(format!(
                "waiting for QMP event {name} through libvirt"
            ))),
        }
    }
}

/// One command through libvirtd, on a blocking thread (libvirt's calls
/// block), with the same deadline as a socket command.
async fn libvirt_call(
    domain: &Arc<super::libvirt::LibvirtDomain>,
    command: &str,
    arguments: Value,
    fd: Option<std::os::fd::OwnedFd>,
) -> Result<Value, QmpError> {
    let domain = domain.clone();
    let name = command.to_string();
    let call = tokio::task::spawn_blocking(move || match (name.as_str(), &fd) {
        ("stop", None) => domain.suspend().map(|()| json!({})),
        // QEMU takes `cont` of a running guest as a no-op; libvirt refuses.
        ("cont", None) if domain.state() == "running" => Ok(json!({})),
        ("cont", None) => domain.resume().map(|()| json!({})),
        _ => domain.monitor_command(&name, &arguments, fd.as_ref()),
    });
    let reply = timeout(COMMAND_TIMEOUT, call)
        .await
        .map_err(|_| QmpError::Timeout(COMMAND_TIMEOUT, format!("QMP command {command}")))?
        .map_err(|e| QmpError::Io(std::io::Error::other(e)))?;
    reply.map_err(|e| match e {
        super::libvirt::LibvirtError::Qmp { class, desc } => QmpError::Command {
            command: command.to_string(),
            class,
            desc,
        },
        // What libvirt's own calls refuse (resume, suspend) reads like a
        // QEMU refusal, so retries on QEMU's words work through libvirt too.
        super::libvirt::LibvirtError::Call { message, .. } => QmpError::Command {
            command: command.to_string(),
            class: "libvirt".into(),
            desc: message,
        },
        other => QmpError::Libvirt(other.to_string()),
    })
}

impl SocketSession {
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(self.line.trim_end())?)
    }

    async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).await?;
        self.await_return(command).await
    }

    async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let mut text = json!({ "execute": command, "arguments": arguments }).to_string();
        text.push('\n');
        let raw = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let sock = self.writer.as_ref();
        loop {
            sock.writable().await?;
            let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    sock.as_raw_fd(),
                    &[IoSlice::new(text.as_bytes())],
                    &cmsg,
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == text.len() => break,
                Ok(n) => {
                    // The fd travelled with the first byte; send the rest plainly.
                    self.writer.write_all(&text.as_bytes()[n..]).await?;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(QmpError::SendFd(nix::Error::from_raw(
                        e.raw_os_error().unwrap_or(0),
                    )))
                }
            }
        }
        self.await_return(command).await
    }

    async fn await_return(&mut self, command: &str) -> Result<Value, QmpError> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .map_err(|_| {
                    QmpError::Timeout(COMMAND_TIMEOUT, format!("QMP command {command}"))
                })??;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("Error").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            }
        }
    }

    async fn wait_event(
        &mut self,
        name: &str,
        within: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        while let Some(ev) = self.events.pop_front() {
            if ev["event"] == name && pred(&ev["data"]) {
                return Ok(ev);
            }
        }
        let deadline = Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .map_err(|_| QmpError::Timeout(within, format!("QMP event {name}")))??;
            if msg["event"] == name && pred(&msg["data"]) {
                return Ok(msg);
            }
        }
    }
}

impl Qmp {
    /// Enables migration capabilities (`x-ignore-shared`, `events`, ...).
    pub async fn set_migration_capabilities(&mut self, caps: &[&str]) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|c| json!({ "capability": c, "state": true }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await?;
        Ok(())
    }

    /// Turns `x-ignore-shared` off again. Left on, a later migration that
    /// is not thaw's (`virsh save`) would silently leave guest RAM out.
    /// A migration that just ended may still be finishing ("in
    /// progress"), so that refusal is retried for a while.
    pub async fn clear_ignore_shared(&mut self) -> Result<(), QmpError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let off =
                json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": false }] });
            match self.execute("migrate-set-capabilities", off).await {
                Ok(_) => return Ok(()),
                Err(QmpError::Command { desc, .. })
                    if desc.contains("in progress") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether QEMU has `x-ignore-shared` on.
    pub async fn ignore_shared(&mut self) -> Result<bool, QmpError> {
        let caps = self
            .execute("query-migrate-capabilities", json!({}))
            .await?;
        Ok(caps
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["capability"] == "x-ignore-shared" && c["state"].as_bool() == Some(true)))
    }

    /// Waits until the migration in progress has completed; a failed
    /// migration becomes an error carrying QEMU's description.
    pub async fn wait_migration(&mut self, within: Duration) -> Result<(), QmpError> {
        if self.is_libvirt() {
            return self.poll_migration(within).await;
        }
        let ev = self
            .wait_event("MIGRATION", within, |d| {
                matches!(
                    d["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
            })
            .await?;
        if ev["data"]["status"] == "completed" {
            return Ok(());
        }
        let info = self
            .execute("query-migrate", json!({}))
            .await
            .unwrap_or(Value::Null);
        Err(QmpError::Command {
            command: "migrate".into(),
            class: ev["data"]["status"]
                .as_str()
                .unwrap_or("failed")
                .to_string(),
            desc: info["error-desc"]
                .as_str()
                .unwrap_or("migration failed")
                .to_string(),
        })
    }

    /// [`Qmp::wait_migration`] without events: polls `query-migrate`.
    async fn poll_migration(&mut self, within: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + within;
        loop {
            let info = self.execute("query-migrate", json!({})).await?;
            match info["status"].as_str() {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: status.to_string(),
                        desc: info["error-desc"]
                            .as_str()
                            .unwrap_or("migration failed")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(within, "the migration".into()));
            }
            tokio::time::sleep(MIGRATION_POLL).await;
        }
    }

    /// `cont`, for a VM whose outgoing migration just completed: QEMU
    /// announces completion before it has finished cleaning up, and refuses
    /// `cont` until then ("Migration is not finalized yet") without an
    /// event to wait for, so this retries that one refusal for a while.
    pub async fn cont_after_migration(&mut self) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.execute("cont", json!({})).await {
                Ok(_) => return Ok(()),
                Err(QmpError::Command { desc, .. })
                    if desc.contains("not finalized") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn run_state(&mut self) -> Result<String, QmpError> {
        let st = self.execute("query-status", json!({})).await?;
        Ok(st["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// QEMU's version as `major.minor.micro`.
    pub async fn version(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-version", json!({})).await?;
        let q = &v["qemu"];
        Ok(format!("{}.{}.{}", q["major"], q["minor"], q["micro"]))
    }
}
