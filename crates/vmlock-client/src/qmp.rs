//! A minimal QMP (QEMU Machine Protocol) client: enough to pause a guest whose lease was lost,
//! and for tests to drive QEMU.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use vmlock::Error;

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let ctx = || format!("QMP socket {}", path.display());
        let stream = UnixStream::connect(path).map_err(|e| Error::io(ctx(), &e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::io(ctx(), &e))?;
        let writer = stream.try_clone().map_err(|e| Error::io(ctx(), &e))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Protocol {
                reason: format!("not a QMP greeting: {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Connects once QEMU has created its QMP socket: QEMU creates it shortly after exec and
    /// offers no event for it, so this retries (every 10 ms) until `timeout`.
    pub fn connect_when_ready(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match Self::connect(path) {
                Ok(q) => return Ok(q),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Live-migrates this (source) QEMU into `destination` (started with `-incoming defer`)
    /// over `uri`, and returns the final status: `completed`, `failed` or `cancelled`.
    pub fn migrate_to(&mut self, destination: &mut Qmp, uri: &str) -> Result<String, Error> {
        destination.execute("migrate-incoming", json!({ "uri": uri }))?;
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        )?;
        self.execute("migrate", json!({ "uri": uri }))?;
        self.migration_result()
    }

    /// Waits for a MIGRATION event with a final status (migration events enabled).
    pub fn migration_result(&mut self) -> Result<String, Error> {
        loop {
            let ev = self.wait_event("MIGRATION")?;
            let status = ev["data"]["status"].as_str().unwrap_or_default().to_owned();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                return Ok(status);
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::io("reading QMP", &e))?;
        if n == 0 {
            return Err(Error::ServiceUnavailable {
                reason: "QEMU closed its QMP socket".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| Error::Protocol {
            reason: format!("bad QMP message {line:?}: {e}"),
        })
    }

    /// Runs `command` with `arguments`; returns its `return` value, or its error as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| Error::io("writing QMP", &e))?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(Error::Protocol {
                    reason: format!("QEMU refused {command}: {}", e.get("desc").unwrap_or(e)),
                });
            }
        }
    }

    /// Waits for an event named `name` (already received ones count).
    pub fn wait_event(&mut self, name: &str) -> Result<Value, Error> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        loop {
            let msg = self.read_message()?;
            if msg["event"] == name {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }
}
