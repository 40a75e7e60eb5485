//! Durable records in the state directory: the source's decision about a VM
//! (`<vm>.decision`), the destination's account of an incoming session
//! (`<vm>.incoming`), and the source's pending releases (`<session>.release`: a
//! destination that may still hold a loaded copy of an aborted migration, to be told to
//! discard it).
//!
//! A record is written to a temporary file, synced, renamed over the old one, and the
//! directory is synced: once [`write`] returns, a crash of the process or the host cannot
//! lose it, and a reader sees the old record or the new one, never a torn one. The format
//! is a few `key=value` lines with a version line first, parsed strictly (the parser is
//! fuzzed: `fuzz/fuzz_targets/record.rs`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::check_vm_id;
use ferry_engine::session::{DecisionState, DestRecord, SessionId};

/// First line of every record.
const HEADER: &str = "ferry-record 1";
/// Largest record read back (a reason and a start line at most).
const MAX_RECORD: u64 = 16 * 1024;

/// Errors writing or reading records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Writing, syncing or renaming failed (a full or read-only state directory, say).
    #[error("Cannot record {what} in {path}")]
    Write {
        /// What was being recorded.
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading failed.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a record this build understands.
    #[error("{path} is not a valid record: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// The source's decision about one migration of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What was decided.
    pub state: DecisionState,
    /// The migration.
    pub session: SessionId,
    /// Its destination, as the operator named it.
    pub to: String,
}

/// A destination that may still hold a loaded copy of an aborted migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The aborted migration.
    pub session: SessionId,
    /// Its VM.
    pub vm_id: String,
    /// Its destination, as the operator named it.
    pub to: String,
}

/// The destination's account of one incoming session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// What happened to the VM here.
    pub record: DestRecord,
    /// The migration.
    pub session: SessionId,
}

fn path_of(dir: &Path, vm_id: &str, ext: &str) -> PathBuf {
    dir.join(format!("{vm_id}.{ext}"))
}

/// Where a VM's decision is recorded. `vm_id` is checked before anything here is called
/// (it names a file: `../x` must not escape the directory).
pub fn decision_path(dir: &Path, vm_id: &str) -> PathBuf {
    path_of(dir, vm_id, "decision")
}

/// Where a VM's incoming record is kept.
pub fn incoming_path(dir: &Path, vm_id: &str) -> PathBuf {
    path_of(dir, vm_id, "incoming")
}

/// A Cloud Hypervisor migration's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChKind {
    /// The source's commit decision (`<vm>.ch-decision`), from the decision until the
    /// source CH was answered; `at` is the destination.
    Decision,
    /// The destination's incoming session (`<vm>.ch-incoming`); `at` is the destination
    /// CH's API socket, asked what became of the VM.
    Incoming,
}

impl ChKind {
    fn name(self) -> &'static str {
        match self {
            ChKind::Decision => "ch-decision",
            ChKind::Incoming => "ch-incoming",
        }
    }
}

/// A Cloud Hypervisor migration's record ([`ChKind`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChRecord {
    /// The migration.
    pub session: SessionId,
    /// The destination (a decision) or the destination CH's API socket (incoming).
    pub at: String,
}

/// Where a CH record of a VM is kept.
pub fn ch_path(dir: &Path, vm_id: &str, kind: ChKind) -> PathBuf {
    path_of(dir, vm_id, kind.name())
}

/// Records a CH migration's decision or incoming session.
///
/// # Errors
///
/// [`RecordError::Write`]; the caller must not act on a decision that is not recorded.
pub fn write_ch(dir: &Path, vm_id: &str, kind: ChKind, r: &ChRecord) -> Result<(), RecordError> {
    debug_assert!(check_vm_id(vm_id).is_ok());
    let text = format!(
        "{HEADER}\nkind={}\nsession={}\nat={}\n",
        kind.name(),
        r.session,
        one_line(&r.at)
    );
    write(&ch_path(dir, vm_id, kind), "the CH migration", &text)
}

/// Reads a CH record; `None` when there is none.
///
/// # Errors
///
/// [`RecordError::Read`], [`RecordError::Invalid`].
pub fn read_ch(dir: &Path, vm_id: &str, kind: ChKind) -> Result<Option<ChRecord>, RecordError> {
    let path = ch_path(dir, vm_id, kind);
    let Some(text) = read_small(&path)? else {
        return Ok(None);
    };
    parse_ch(&text, kind)
        .map(Some)
        .map_err(|why| RecordError::Invalid {
            path: path.display().to_string(),
            why,
        })
}

/// Removes a CH record (settled).
pub fn remove_ch(dir: &Path, vm_id: &str, kind: ChKind) {
    let _ = std::fs::remove_file(ch_path(dir, vm_id, kind));
}

/// Parses a CH record.
///
/// # Errors
///
/// What is wrong, for the operator.
pub fn parse_ch(text: &str, kind: ChKind) -> Result<ChRecord, String> {
    let f = fields(text, kind.name())?;
    Ok(ChRecord {
        session: session_of(&f)?,
        at: get(&f, "at")?.to_owned(),
    })
}

/// Where a pending release is kept.
pub fn release_path(dir: &Path, session: SessionId) -> PathBuf {
    dir.join(format!("{session}.release"))
}

/// Writes `text` durably to `path` (temporary file, sync, rename, directory sync).
fn write(path: &Path, what: &'static str, text: &str) -> Result<(), RecordError> {
    let err = |source| RecordError::Write {
        what,
        path: path.display().to_string(),
        source,
    };
    // `<name>.tmp`, not `<stem>.tmp`: a VM's decision and incoming records (written by
    // different threads when it migrates back and forth) never share a temporary file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(err)?;
    let res = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// Records a decision.
///
/// # Errors
///
/// [`RecordError::Write`]; the caller must not act on a decision that is not recorded.
pub fn write_decision(dir: &Path, vm_id: &str, d: &Decision) -> Result<(), RecordError> {
    debug_assert!(check_vm_id(vm_id).is_ok());
    let text = format!(
        "{HEADER}\nkind=decision\nstate={}\nsession={}\nto={}\n",
        d.state.name(),
        d.session,
        d.to
    );
    write(&decision_path(dir, vm_id), "the commit decision", &text)
}

/// Records what happened to an incoming session.
///
/// # Errors
///
/// [`RecordError::Write`].
pub fn write_incoming(dir: &Path, vm_id: &str, r: &Incoming) -> Result<(), RecordError> {
    debug_assert!(check_vm_id(vm_id).is_ok());
    let mut text = format!(
        "{HEADER}\nkind=incoming\nstate={}\nsession={}\n",
        r.record.name(),
        r.session
    );
    match &r.record {
        DestRecord::Running(detail) => text.push_str(&format!("detail={}\n", one_line(detail))),
        DestRecord::StartFailed {
            reason,
            may_have_run,
        } => text.push_str(&format!(
            "detail={}\nmay_have_run={may_have_run}\n",
            one_line(reason)
        )),
        DestRecord::Committed | DestRecord::Discarded => {}
    }
    write(&incoming_path(dir, vm_id), "the incoming session", &text)
}

/// Records a pending release.
///
/// # Errors
///
/// [`RecordError::Write`]: the caller must keep its own record of the obligation.
pub fn write_release(dir: &Path, r: &Release) -> Result<(), RecordError> {
    debug_assert!(check_vm_id(&r.vm_id).is_ok());
    let text = format!(
        "{HEADER}\nkind=release\nsession={}\nvm={}\nto={}\n",
        r.session,
        r.vm_id,
        one_line(&r.to)
    );
    write(&release_path(dir, r.session), "the pending release", &text)
}

/// Forgets a release the destination answered.
pub fn remove_release(dir: &Path, session: SessionId) {
    let _ = std::fs::remove_file(release_path(dir, session));
}

/// Every pending release in `dir`, and the files that are not valid release records.
pub fn pending_releases(dir: &Path) -> (Vec<Release>, Vec<RecordError>) {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (ok, bad);
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("release") {
            continue;
        }
        match read_small(&path).and_then(|t| {
            parse_release(t.as_deref().unwrap_or_default()).map_err(|why| RecordError::Invalid {
                path: path.display().to_string(),
                why,
            })
        }) {
            Ok(r) => ok.push(r),
            Err(e) => bad.push(e),
        }
    }
    ok.sort_by_key(|r| r.session.0);
    (ok, bad)
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Reads a VM's decision; `None` when none is recorded.
///
/// # Errors
///
/// [`RecordError::Read`], [`RecordError::Invalid`].
pub fn read_decision(dir: &Path, vm_id: &str) -> Result<Option<Decision>, RecordError> {
    let path = decision_path(dir, vm_id);
    let Some(text) = read_small(&path)? else {
        return Ok(None);
    };
    parse_decision(&text)
        .map(Some)
        .map_err(|why| RecordError::Invalid {
            path: path.display().to_string(),
            why,
        })
}

/// Reads a VM's incoming record; `None` when there is none.
///
/// # Errors
///
/// [`RecordError::Read`], [`RecordError::Invalid`].
pub fn read_incoming(dir: &Path, vm_id: &str) -> Result<Option<Incoming>, RecordError> {
    let path = incoming_path(dir, vm_id);
    let Some(text) = read_small(&path)? else {
        return Ok(None);
    };
    parse_incoming(&text)
        .map(Some)
        .map_err(|why| RecordError::Invalid {
            path: path.display().to_string(),
            why,
        })
}

/// Finds the incoming record of `session` (a replayed decision names only the session).
pub fn find_incoming(dir: &Path, session: SessionId) -> Option<(String, Incoming)> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vm_id) = name.strip_suffix(".incoming") else {
            continue;
        };
        if check_vm_id(vm_id).is_err() {
            continue;
        }
        if let Ok(Some(r)) = read_incoming(dir, vm_id) {
            if r.session == session {
                return Some((vm_id.to_owned(), r));
            }
        }
    }
    None
}

fn read_small(path: &Path) -> Result<Option<String>, RecordError> {
    let err = |source| RecordError::Read {
        path: path.display().to_string(),
        source,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut text = String::new();
    use std::io::Read;
    f.take(MAX_RECORD + 1)
        .read_to_string(&mut text)
        .map_err(err)?;
    if text.len() as u64 > MAX_RECORD {
        return Err(RecordError::Invalid {
            path: path.display().to_string(),
            why: format!("longer than {MAX_RECORD} bytes"),
        });
    }
    Ok(Some(text))
}

/// The `key=value` lines after the header, each key once.
fn fields(text: &str, kind: &str) -> Result<Vec<(String, String)>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("the first line is not {HEADER:?}"));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?} is not key=value"))?;
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("{k} appears twice"));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    if get(&out, "kind")? != kind {
        return Err(format!("not a {kind} record"));
    }
    Ok(out)
}

fn get<'a>(f: &'a [(String, String)], key: &str) -> Result<&'a str, String> {
    f.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| format!("no {key}"))
}

fn session_of(f: &[(String, String)]) -> Result<SessionId, String> {
    let s = get(f, "session")?;
    SessionId::from_hex(s).ok_or_else(|| format!("bad session {s:?}"))
}

/// Parses a decision record.
///
/// # Errors
///
/// What is wrong, for the operator.
pub fn parse_decision(text: &str) -> Result<Decision, String> {
    let f = fields(text, "decision")?;
    let state = get(&f, "state")?;
    Ok(Decision {
        state: DecisionState::from_name(state).ok_or_else(|| format!("bad state {state:?}"))?,
        session: session_of(&f)?,
        to: get(&f, "to")?.to_owned(),
    })
}

/// Parses a release record.
///
/// # Errors
///
/// What is wrong, for the operator.
pub fn parse_release(text: &str) -> Result<Release, String> {
    let f = fields(text, "release")?;
    let vm_id = get(&f, "vm")?;
    check_vm_id(vm_id).map_err(|e| format!("bad vm {vm_id:?}: {e}"))?;
    Ok(Release {
        session: session_of(&f)?,
        vm_id: vm_id.to_owned(),
        to: get(&f, "to")?.to_owned(),
    })
}

/// Parses an incoming record.
///
/// # Errors
///
/// What is wrong, for the operator.
pub fn parse_incoming(text: &str) -> Result<Incoming, String> {
    let f = fields(text, "incoming")?;
    let record = match get(&f, "state")? {
        "committed" => DestRecord::Committed,
        "running" => DestRecord::Running(get(&f, "detail")?.to_owned()),
        "start-failed" => DestRecord::StartFailed {
            reason: get(&f, "detail")?.to_owned(),
            may_have_run: match get(&f, "may_have_run")? {
                "true" => true,
                "false" => false,
                v => return Err(format!("bad may_have_run {v:?}")),
            },
        },
        "discarded" => DestRecord::Discarded,
        s => return Err(format!("bad state {s:?}")),
    };
    Ok(Incoming {
        record,
        session: session_of(&f)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ch_records_round_trip_and_are_not_taken_for_each_other() {
        let dir = std::env::temp_dir().join(format!("ferry-ch-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let r = ChRecord {
            session: SessionId([7; 16]),
            at: "10.0.0.2:7780".into(),
        };
        write_ch(&dir, "vm1", ChKind::Decision, &r).expect("written");
        assert_eq!(
            read_ch(&dir, "vm1", ChKind::Decision).expect("read"),
            Some(r.clone())
        );
        assert_eq!(read_ch(&dir, "vm1", ChKind::Incoming).expect("read"), None);
        assert_eq!(
            read_decision(&dir, "vm1").expect("read"),
            None,
            "not a Ferry decision"
        );
        let text = std::fs::read_to_string(ch_path(&dir, "vm1", ChKind::Decision)).expect("text");
        assert!(parse_ch(&text, ChKind::Incoming).is_err());
        remove_ch(&dir, "vm1", ChKind::Decision);
        assert_eq!(read_ch(&dir, "vm1", ChKind::Decision).expect("read"), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-records-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn decisions_and_incoming_records_round_trip() {
        let d = dir("rt");
        let dec = Decision {
            state: DecisionState::Committed,
            session: SessionId([0xab; 16]),
            to: "10.0.0.2:7780".into(),
        };
        assert_eq!(read_decision(&d, "vm1").expect("read"), None);
        write_decision(&d, "vm1", &dec).expect("write");
        assert_eq!(read_decision(&d, "vm1").expect("read"), Some(dec));
        for record in [
            DestRecord::Committed,
            DestRecord::Running("guest ok\nsecond line".into()),
            DestRecord::StartFailed {
                reason: "no".into(),
                may_have_run: true,
            },
            DestRecord::Discarded,
        ] {
            let inc = Incoming {
                record,
                session: SessionId([1; 16]),
            };
            write_incoming(&d, "vm1", &inc).expect("write");
            let back = read_incoming(&d, "vm1").expect("read").expect("some");
            assert_eq!(back.session, inc.session);
            assert_eq!(back.record.name(), inc.record.name());
        }
        assert!(!d.join("vm1.decision.tmp").exists());
        assert!(!d.join("vm1.incoming.tmp").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn pending_releases_are_listed_until_removed_and_bad_files_reported() {
        let d = dir("rel");
        let r = |b: u8, vm: &str| Release {
            session: SessionId([b; 16]),
            vm_id: vm.into(),
            to: "10.0.0.2:7780".into(),
        };
        write_release(&d, &r(2, "vm2")).expect("write");
        write_release(&d, &r(1, "vm1")).expect("write");
        std::fs::write(
            d.join("junk.release"),
            "ferry-record 1\nkind=release\nvm=../x\n",
        )
        .expect("junk");
        let (ok, bad) = pending_releases(&d);
        assert_eq!(ok, vec![r(1, "vm1"), r(2, "vm2")]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        remove_release(&d, SessionId([1; 16]));
        assert_eq!(pending_releases(&d).0, vec![r(2, "vm2")]);
        assert!(parse_release("ferry-record 1\nkind=decision\n").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_write_that_fails_leaves_the_old_record_and_says_why() {
        let d = dir("ro");
        let dec = Decision {
            state: DecisionState::Confirmed,
            session: SessionId([2; 16]),
            to: "h:1".into(),
        };
        write_decision(&d, "vm1", &dec).expect("write");
        // A directory in place of the temporary file makes the write fail for any user.
        std::fs::create_dir_all(d.join("vm1.decision.tmp")).expect("blocker");
        // The incoming record of the same VM is not in its way.
        let inc = Incoming {
            record: DestRecord::Discarded,
            session: SessionId([3; 16]),
        };
        write_incoming(&d, "vm1", &inc).expect("an incoming record writes beside it");
        let e = write_decision(
            &d,
            "vm1",
            &Decision {
                state: DecisionState::Aborted,
                ..dec.clone()
            },
        )
        .expect_err("must fail");
        assert!(e.to_string().contains("commit decision"), "{e}");
        assert_eq!(read_decision(&d, "vm1").expect("read"), Some(dec));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn malformed_records_are_refused_with_a_reason() {
        for bad in [
            "",
            "ferry-record 2\nkind=decision\n",
            "ferry-record 1\nkind=decision\nstate=committed\nsession=zz\nto=x\n",
            "ferry-record 1\nkind=decision\nstate=maybe\nsession=00000000000000000000000000000000\nto=x\n",
            "ferry-record 1\nkind=decision\nstate=committed\nstate=aborted\nsession=00000000000000000000000000000000\nto=x\n",
            "ferry-record 1\nkind=incoming\nstate=committed\nsession=00000000000000000000000000000000\nto=x\n",
            "ferry-record 1\nno equals sign\n",
        ] {
            assert!(parse_decision(bad).is_err(), "{bad:?}");
        }
        assert!(parse_incoming("ferry-record 1\nkind=incoming\nstate=start-failed\nsession=00000000000000000000000000000000\ndetail=x\nmay_have_run=perhaps\n").is_err());
    }
}
