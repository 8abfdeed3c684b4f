//! TensorBoard event files, written without TensorFlow: every `metrics.jsonl` scalar can also be
//! watched live with `tensorboard --logdir runs/` (see [`crate::metrics::JsonlWriter::with_tensorboard`]).
//!
//! Why our own writer: the Rust crates that write event files are not kept up
//! (`tensorboard-rs` 0.5.9 pulls rust-protobuf 2 and image 0.23; `tboard` 0.1.1 had one release,
//! on prost 0.12 and anyhow). The format is small: a few protobuf fields, encoded here by
//! [`prost`] from hand-written messages (no build script, no `protoc`), in TFRecord frames
//! checksummed with [`crc32c`].
//!
//! # Format
//!
//! One file `events.out.tfevents.<unix_secs>.<hostname>.<pid>.sobre` per [`EventWriter`] (a
//! counter `.1`, `.2`, … is appended if that name is already taken). It is a sequence of
//! TFRecord frames:
//!
//! ```text
//! u64 LE   length of data
//! u32 LE   masked_crc32c(the 8 length bytes)
//! [u8]     data: one serialised tensorboard `Event`
//! u32 LE   masked_crc32c(data)
//! ```
//!
//! with `masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8` (wrapping), `c = crc32c(x)`.
//! The first record is `Event { wall_time, file_version: "brain.Event:2" }`; then each scalar is
//! its own `Event { wall_time, step, summary: Summary { value: [Value { tag, simple_value }] } }`
//! (field numbers of tensorboard's `event.proto` / `summary.proto`, see [`Event`]).
//!
//! Each record goes to the file in one `write` as soon as it is added (the file is unbuffered):
//! a run can be killed at any time, and a torn record at the end is skipped by TensorBoard.
//!
//! A resumed run opens a new file and writes the steps it redoes again; TensorBoard shows each
//! of those steps twice, with the same values (resume is exact).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::TrainError;

/// tensorboard `Event` (event.proto): `wall_time = 1`, `step = 2`, `file_version = 3`,
/// `summary = 5` (the last two are a `oneof` there: at most one is set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `"brain.Event:2"` in the first record of a file.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// tensorboard `Summary` (summary.proto): `repeated Value value = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// tensorboard `Summary.Value`: `tag = 1`, `simple_value = 2` (a float in the `value` oneof, so
/// it is written even when 0: TensorBoard drops a value whose oneof is unset).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// The TFRecord checksum: crc32c rotated right by 15 bits plus `0xa282ead8`.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    // `(c >> 15) | (c << 17)` in TensorFlow's crc32c.h.
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data` (layout in the module docs).
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Writes one TensorBoard event file in a directory.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Create `dir` (and parents) and a new event file in it, and write the file-version record.
    pub fn create(dir: &Path) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!(
            "events.out.tfevents.{now}.{}.{}.sobre",
            hostname(),
            std::process::id()
        );
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(TrainError::io(&path, e)),
            }
        };
        let mut w = EventWriter { path, file };
        w.write_event(&Event {
            wall_time: wall_time(),
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one scalar (`simple_value`) as its own event, at the current wall time.
    pub fn add_scalar(&mut self, tag: &str, step: i64, value: f32) -> Result<(), TrainError> {
        self.write_event(&Event {
            wall_time: wall_time(),
            step,
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: tag.to_string(),
                    simple_value: Some(value),
                }],
            }),
            ..Default::default()
        })
    }

    /// Append one event, framed, in a single write.
    pub fn write_event(&mut self, event: &Event) -> Result<(), TrainError> {
        let rec = frame(&event.encode_to_vec());
        self.file
            .write_all(&rec)
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's host name for the file name (`localhost` when it cannot be read), with
/// anything but ASCII letters, digits, `-` and `_` replaced by `_`.
fn hostname() -> String {
    let raw = raw_hostname().unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(unix)]
fn raw_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(not(unix))]
fn raw_hostname() -> Option<String> {
    std::env::var("COMPUTERNAME").ok()
}

/// Read an event file back: every complete frame's `Event`, checking both checksums. A torn
/// frame at the end (a killed run) ends the list; a bad checksum or undecodable event is an
/// error. For tests and tools.
pub fn read_events(path: &Path) -> Result<Vec<Event>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if crc != masked_crc32c(len_bytes) {
            return Err(format!("bad length checksum at byte {at}"));
        }
        let start = at + 12;
        let Some(end) = start.checked_add(len).filter(|&e| e + 4 <= bytes.len()) else {
            break; // torn record
        };
        let data = &bytes[start..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap());
        if crc != masked_crc32c(data) {
            return Err(format!("bad data checksum at byte {at}"));
        }
        out.push(Event::decode(data).map_err(|e| format!("event at byte {at}: {e}"))?);
        at = end + 4;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value_and_mask() {
        // The standard CRC-32C check value, then the mask by hand:
        // 0xE3069283 rotated right 15 = 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let c: u32 = 0xE306_9283;
        assert_eq!(c.rotate_right(15), 0x2507_C60D);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        // crc32c("") = 0, so the mask is the constant alone.
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
        // Wrapping add: crc32c("abc") = 0x364B3FB7, rotated 0x7F6E6C96, + 0xA282EAD8 overflows.
        assert_eq!(masked_crc32c(b"abc"), 0x21F1_576E);
    }

    #[test]
    fn frame_bytes_of_a_small_payload() {
        // length 3 as u64 LE; masked crc32c of those 8 bytes = 0x0E4999B0 (crc 0x576C35E3);
        // "abc"; masked crc32c("abc") = 0x21F1576E.
        assert_eq!(
            frame(b"abc"),
            vec![
                3, 0, 0, 0, 0, 0, 0, 0, 0xB0, 0x99, 0x49, 0x0E, b'a', b'b', b'c', 0x6E, 0x57, 0xF1,
                0x21
            ]
        );
        assert_eq!(frame(b"").len(), 16);
    }

    #[test]
    fn event_encoding_field_numbers() {
        // wall_time=1 (fixed64, key 0x09), step=2 (varint, key 0x10), summary=5 (len, key 0x2a);
        // Value.tag=1 (0x0a), simple_value=2 (fixed32, key 0x15), 0.0 still written.
        let e = Event {
            wall_time: 1.5,
            step: 3,
            file_version: None,
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: "a".into(),
                    simple_value: Some(0.0),
                }],
            }),
        };
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 3, 0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15, 0, 0, 0, 0]);
        assert_eq!(e.encode_to_vec(), want);
        let v = Event {
            wall_time: 0.0,
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        };
        let mut want = vec![0x1a, 13];
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(v.encode_to_vec(), want);
    }

    #[test]
    fn written_file_decodes_back() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("run").join("tensorboard");
        let mut w = EventWriter::create(&sub).unwrap();
        w.add_scalar("sft/loss", 1, 2.5).unwrap();
        w.add_scalar("grpo/reward_mean", 3, 0.125).unwrap();
        w.add_scalar("grpo/kl", 0, 0.0).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("events.out.tfevents.") && name.ends_with(".sobre"),
            "{name}"
        );
        assert!(name.contains(&format!(".{}.sobre", std::process::id())));
        let path = w.path().to_path_buf();
        drop(w);

        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events[0].summary.is_none() && events[0].wall_time > 1.6e9);
        let got: Vec<(String, i64, Option<f32>)> = events[1..]
            .iter()
            .map(|e| {
                let v = &e.summary.as_ref().unwrap().value;
                assert_eq!(v.len(), 1);
                assert!(e.file_version.is_none());
                (v[0].tag.clone(), e.step, v[0].simple_value)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("sft/loss".into(), 1, Some(2.5)),
                ("grpo/reward_mean".into(), 3, Some(0.125)),
                ("grpo/kl".into(), 0, Some(0.0)),
            ]
        );

        // A torn last record (killed mid-write) is skipped; a flipped byte is an error.
        let mut bytes = std::fs::read(&path).unwrap();
        let full = bytes.len();
        bytes.extend_from_slice(&frame(b"xxxxxxxx")[..10]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 4);
        bytes.truncate(full);
        bytes[full - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_events(&path).unwrap_err().contains("checksum"));
    }

    #[test]
    fn second_writer_same_second_gets_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(b.path().to_str().unwrap().contains("tfevents"));
    }
}
