//! A small native PostgreSQL client: the simple query protocol and the
//! physical replication protocol (IDENTIFY_SYSTEM, TIMELINE_HISTORY,
//! replication slots, START_REPLICATION, BASE_BACKUP), over TCP or a Unix
//! socket, without TLS. Messages are encoded and decoded by
//! `postgres-protocol` (rust-postgres), which also does SCRAM-SHA-256 and
//! MD5; the framing is ours because that crate does not know the
//! replication-only CopyBothResponse.
//!
//! Reads are cancel-safe: what arrived stays buffered in the connection,
//! and [`WalStream::next`] keeps its progress through the end of a stream
//! in the stream, so it may sit in a `select!`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::dsn::{Dsn, Host, TLS_UNSUPPORTED};

/// How long [`Conn::connect`] may take, from the TCP connect to
/// ReadyForQuery.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// The least free space in the read buffer before a read.
const READ_CHUNK: usize = 64 * 1024;

/// The CopyBothResponse tag (replication only; postgres-protocol does not
/// parse it).
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection to a PostgreSQL server, normal or replication.
pub struct Conn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    /// Encoded messages not yet written (written before every read).
    wbuf: BytesMut,
    /// `user@host:port/db`, for errors.
    who: String,
    user: String,
    /// A base backup's CopyOut is running or has ended.
    backup: BackupState,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BackupState {
    None,
    Copying,
    CopyDone,
}

/// The answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemId {
    /// The cluster's system identifier (a u64, as text: what
    /// `pg_control_system()` shows).
    pub system_id: String,
    /// The server's current timeline.
    pub timeline: u32,
    /// The server's current WAL flush position (on a standby: replay).
    pub xlogpos: u64,
    /// The database of a logical replication connection; `None` here.
    pub dbname: Option<String>,
}

/// A message of a physical WAL stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMsg {
    /// XLogData: WAL bytes starting at LSN `start`.
    Data { start: u64, data: Bytes },
    /// The server's keepalive: its WAL end; `reply`: it wants a status
    /// update now (else it will time the connection out).
    Keepalive { wal_end: u64, reply: bool },
    /// The server ended the stream: at the end of a timeline that is not
    /// the server's latest, `next_timeline` is `Some((next tli, LSN where it
    /// starts))` and the connection can start streaming it
    /// ([`WalStream::into_conn`]); `None` when the server shut down.
    End { next_timeline: Option<(u32, u64)> },
}

/// A piece of a base backup's CopyOut stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupChunk {
    /// A new archive starts (`base.tar` for the data directory, `<oid>.tar`
    /// for a tablespace at `tablespace_path`); the next `Data` chunks are
    /// its tar bytes.
    Archive {
        name: String,
        tablespace_path: Option<String>,
    },
    /// Bytes of the current archive, or of the manifest after `Manifest`.
    Data(Bytes),
    /// The backup manifest starts; the next `Data` chunks are its JSON.
    Manifest,
    /// Bytes sent so far (only with PROGRESS, which is off).
    Progress(u64),
}

/// What BASE_BACKUP answers before the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStart {
    /// The backup's start LSN (its checkpoint's redo point).
    pub start_lsn: u64,
    pub timeline: u32,
    /// The tablespaces other than the data directory: (oid, path).
    pub tablespaces: Vec<(u32, String)>,
}

/// What BASE_BACKUP answers after the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupEnd {
    /// WAL up to here is needed to make the backup consistent.
    pub end_lsn: u64,
    pub timeline: u32,
}

/// An ErrorResponse from the server, as the error in an `anyhow::Error`
/// (downcast to read its SQLSTATE, e.g. `58P01` for WAL already removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// `ERROR`, `FATAL` or `PANIC`.
    pub severity: String,
    /// The SQLSTATE.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {}

impl PgError {
    fn from_fields(mut fields: backend::ErrorFields<'_>) -> PgError {
        let mut e = PgError {
            severity: "ERROR".into(),
            code: "XX000".into(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut localized_severity = None;
        while let Ok(Some(field)) = fields.next() {
            let v = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => e.severity = v,
                b'S' => localized_severity = Some(v),
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        if e.severity == "ERROR" {
            if let Some(s) = localized_severity {
                e.severity = s;
            }
        }
        e
    }
}

/// Parse an LSN as PostgreSQL prints it: `16/B374D848`.
pub fn parse_lsn(s: &str) -> anyhow::Result<u64> {
    let bad = || anyhow!("bad LSN {s:?} (expected two hex numbers like 16/B374D848)");
    let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
    let part = |p: &str| {
        if p.is_empty() || p.len() > 8 {
            return Err(bad());
        }
        u32::from_str_radix(p, 16).map_err(|_| bad())
    };
    Ok((u64::from(part(hi)?) << 32) | u64::from(part(lo)?))
}

/// Format an LSN as PostgreSQL does: `16/B374D848` (uppercase hex).
pub fn format_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF)
}

/// A backend message, or the CopyBothResponse postgres-protocol lacks.
enum Msg {
    Pg(backend::Message),
    CopyBoth,
}

/// Rows of a query, cells as raw bytes.
type RawRows = Vec<Vec<Option<Bytes>>>;

impl Conn {
    /// Connect and authenticate (trust, cleartext, MD5 or SCRAM-SHA-256)
    /// within 10 s. `replication=false`: a normal session on `dsn.dbname`
    /// (default: the user name). `replication=true`: a physical replication
    /// connection (the role needs the REPLICATION attribute).
    pub async fn connect(dsn: &Dsn, replication: bool) -> anyhow::Result<Conn> {
        if matches!(
            dsn.sslmode.as_str(),
            "require" | "verify-ca" | "verify-full"
        ) {
            bail!("sslmode={}: {TLS_UNSUPPORTED}", dsn.sslmode);
        }
        let res = tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(dsn, replication))
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "timed out after {} s connecting to PostgreSQL at {} (is the server running and reachable?)",
                    CONNECT_TIMEOUT.as_secs(),
                    dsn.address()
                ))
            });
        // The server never echoes a password, and neither do we; this is the
        // belt to those braces.
        res.map_err(|e| match &dsn.password {
            Some(pw) if pw.len() >= 3 && format!("{e:#}").contains(pw.as_str()) => {
                anyhow!("{}", format!("{e:#}").replace(pw.as_str(), "***"))
            }
            _ => e,
        })
    }

    async fn connect_inner(dsn: &Dsn, replication: bool) -> anyhow::Result<Conn> {
        let refused = |e: std::io::Error| {
            anyhow!(
                "cannot connect to PostgreSQL at {}: {e} (is the server running and listening?)",
                dsn.address()
            )
        };
        let io: Box<dyn Io> = match &dsn.host {
            Host::Tcp(h) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), dsn.port))
                    .await
                    .map_err(refused)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", dsn.port));
                Box::new(
                    tokio::net::UnixStream::connect(&path)
                        .await
                        .map_err(refused)?,
                )
            }
        };
        let mut conn = Conn {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            who: dsn.display(),
            user: dsn.user.clone(),
            backup: BackupState::None,
        };
        let mut params: Vec<(&str, &str)> =
            vec![("user", dsn.user.as_str()), ("client_encoding", "UTF8")];
        if replication {
            params.push(("replication", "true"));
        } else {
            params.push(("database", dsn.database()));
        }
        if let Some(app) = &dsn.application_name {
            params.push(("application_name", app.as_str()));
        }
        frontend::startup_message(params.iter().copied(), &mut conn.wbuf)?;
        conn.authenticate(dsn).await?;
        // BackendKeyData, ParameterStatus… until ReadyForQuery.
        loop {
            match conn.recv().await? {
                Msg::Pg(backend::Message::ReadyForQuery(_)) => break,
                Msg::Pg(backend::Message::BackendKeyData(_)) => {}
                Msg::Pg(backend::Message::ErrorResponse(body)) => {
                    return Err(conn.startup_error(PgError::from_fields(body.fields())))
                }
                other => bail!(
                    "PostgreSQL at {}: unexpected message {} during startup",
                    conn.who,
                    describe(&other)
                ),
            }
        }
        Ok(conn)
    }

    async fn authenticate(&mut self, dsn: &Dsn) -> anyhow::Result<()> {
        let need_password = |how: &str| -> anyhow::Result<&[u8]> {
            match &dsn.password {
                Some(p) => Ok(p.as_bytes()),
                None => bail!(
                    "PostgreSQL at {} asks for a password ({how}) for user {} and none is set (give it in the DSN, PGPASSWORD or the passfile ~/.pgpass)",
                    dsn.address(),
                    dsn.user
                ),
            }
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = match self.recv().await? {
                Msg::Pg(m) => m,
                Msg::CopyBoth => bail!(
                    "PostgreSQL at {}: unexpected CopyBothResponse during authentication",
                    self.who
                ),
            };
            match msg {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(need_password("cleartext")?, &mut self.wbuf)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        dsn.user.as_bytes(),
                        need_password("MD5")?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut found = false;
                    let mut names = Vec::new();
                    while let Some(m) = mechs.next()? {
                        found |= m == SCRAM_SHA_256;
                        names.push(m.to_string());
                    }
                    if !found {
                        bail!(
                            "PostgreSQL at {} offers only SASL mechanisms {names:?}; offsite speaks SCRAM-SHA-256 (without TLS, so not the -PLUS variant)",
                            dsn.address()
                        );
                    }
                    let s = ScramSha256::new(need_password("SCRAM-SHA-256")?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("PostgreSQL sent SASL data before choosing a mechanism"))?;
                    s.update(body.data())
                        .context("SCRAM-SHA-256 authentication: bad server message")?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| anyhow!("PostgreSQL sent SASL data before choosing a mechanism"))?;
                    s.finish(body.data()).context(
                        "SCRAM-SHA-256 authentication: the server's signature is wrong (is this the right server?)",
                    )?;
                }
                backend::Message::ErrorResponse(body) => {
                    return Err(self.startup_error(PgError::from_fields(body.fields())))
                }
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationGssContinue(_)
                | backend::Message::AuthenticationSspi => bail!(
                    "PostgreSQL at {} asks for Kerberos/GSSAPI/SSPI authentication, which offsite does not support (use scram-sha-256, md5, password or trust in pg_hba.conf)",
                    dsn.address()
                ),
                other => bail!(
                    "PostgreSQL at {}: unexpected message {} during authentication",
                    dsn.address(),
                    describe(&Msg::Pg(other))
                ),
            }
        }
    }

    /// A friendly error for a server error while connecting.
    fn startup_error(&self, e: PgError) -> anyhow::Error {
        let user = &self.user;
        let who = &self.who;
        match e.code.as_str() {
            "28P01" => anyhow!(
                "password authentication failed for user {user} (check PGPASSWORD or the passfile) [PostgreSQL {who}: {e}]"
            ),
            "42501" if e.message.contains("replication") => anyhow!(
                "PostgreSQL {who}: {e}; the role {user} lacks the REPLICATION attribute: grant it: ALTER ROLE {user} REPLICATION"
            ),
            _ => anyhow!("PostgreSQL {who} refused the connection: {e}"),
        }
    }

    /// Simple query protocol: the rows of all result sets of `sql`,
    /// concatenated, each cell as text (`None` for NULL). A server error is
    /// an `Err` holding a [`PgError`] (SQLSTATE, message, detail, hint).
    pub async fn simple_query(&mut self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        let rows = self.query_raw(sql).await?;
        rows.into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|cell| {
                        cell.map(|b| {
                            String::from_utf8(b.to_vec()).map_err(|_| {
                                anyhow!("PostgreSQL {}: a value is not UTF-8", self.who)
                            })
                        })
                        .transpose()
                    })
                    .collect()
            })
            .collect()
    }

    /// Run `sql` and collect the rows, raw.
    async fn query_raw(&mut self, sql: &str) -> anyhow::Result<RawRows> {
        self.check_idle()?;
        frontend::query(sql, &mut self.wbuf)?;
        let mut rows = Vec::new();
        let mut error: Option<PgError> = None;
        loop {
            match self.recv().await? {
                Msg::Pg(m) => match m {
                    backend::Message::DataRow(body) => rows.push(data_row(&body)?),
                    backend::Message::RowDescription(_)
                    | backend::Message::CommandComplete(_)
                    | backend::Message::EmptyQueryResponse => {}
                    backend::Message::ErrorResponse(body) => {
                        error.get_or_insert(PgError::from_fields(body.fields()));
                    }
                    backend::Message::CopyInResponse(_) => {
                        frontend::copy_fail(
                            "offsite's simple_query does not do COPY FROM",
                            &mut self.wbuf,
                        )?;
                    }
                    // A COPY TO: drained and dropped.
                    backend::Message::CopyOutResponse(_)
                    | backend::Message::CopyData(_)
                    | backend::Message::CopyDone => {}
                    backend::Message::ReadyForQuery(_) => break,
                    other => bail!(
                        "PostgreSQL {}: unexpected message {} in a query's answer",
                        self.who,
                        describe(&Msg::Pg(other))
                    ),
                },
                Msg::CopyBoth => bail!(
                    "PostgreSQL {}: the query started a replication stream (use start_physical)",
                    self.who
                ),
            }
        }
        match error {
            Some(e) => Err(anyhow::Error::new(e))
                .with_context(|| format!("PostgreSQL {}: {}", self.who, short(sql))),
            None => Ok(rows),
        }
    }

    fn check_idle(&self) -> anyhow::Result<()> {
        match self.backup {
            BackupState::None => Ok(()),
            _ => bail!("a base backup is running on this connection: read it to the end and call finish_base_backup first"),
        }
    }

    /// IDENTIFY_SYSTEM (replication connections).
    pub async fn identify_system(&mut self) -> anyhow::Result<SystemId> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = one_row(&rows, 4, "IDENTIFY_SYSTEM")?;
        Ok(SystemId {
            system_id: cell(row, 0, "systemid")?.to_string(),
            timeline: cell(row, 1, "timeline")?
                .parse()
                .context("IDENTIFY_SYSTEM: bad timeline")?,
            xlogpos: parse_lsn(cell(row, 2, "xlogpos")?)?,
            dbname: row[3].clone(),
        })
    }

    /// TIMELINE_HISTORY `tli`: the history file's name and content (for
    /// timelines after the first; the server has none for timeline 1).
    pub async fn timeline_history(&mut self, tli: u32) -> anyhow::Result<(String, Vec<u8>)> {
        let rows = self.query_raw(&format!("TIMELINE_HISTORY {tli}")).await?;
        if rows.len() != 1 || rows[0].len() != 2 {
            bail!(
                "TIMELINE_HISTORY {tli}: unexpected answer ({} rows)",
                rows.len()
            );
        }
        let name = rows[0][0]
            .as_ref()
            .ok_or_else(|| anyhow!("TIMELINE_HISTORY {tli}: no file name"))?;
        let name =
            String::from_utf8(name.to_vec()).context("TIMELINE_HISTORY: file name not UTF-8")?;
        let content = rows[0][1].as_ref().map(|b| b.to_vec()).unwrap_or_default();
        Ok((name, content))
    }

    /// Create the physical replication slot `name` (reserving WAL from now)
    /// unless it exists; `true` if it was created. A logical slot of that
    /// name is an error.
    pub async fn ensure_physical_slot(&mut self, name: &str) -> anyhow::Result<bool> {
        check_slot_name(name)?;
        if self.read_slot(name).await?.is_some() {
            return Ok(false);
        }
        match self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {name} PHYSICAL RESERVE_WAL"
            ))
            .await
        {
            Ok(_) => Ok(true),
            // Created concurrently since we looked.
            Err(e)
                if e.downcast_ref::<PgError>()
                    .is_some_and(|p| p.code == "42710") =>
            {
                match self.read_slot(name).await? {
                    Some(_) => Ok(false),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// READ_REPLICATION_SLOT `name` (PostgreSQL 15+): `None` if there is no
    /// such slot, else its (restart_lsn, restart timeline), `None` where the
    /// slot reserves no WAL yet. A logical slot is an error.
    pub async fn read_slot(
        &mut self,
        name: &str,
    ) -> anyhow::Result<Option<(Option<u64>, Option<u32>)>> {
        check_slot_name(name)?;
        let rows = self
            .simple_query(&format!("READ_REPLICATION_SLOT {name}"))
            .await?;
        let row = one_row(&rows, 3, "READ_REPLICATION_SLOT")?;
        match row[0].as_deref() {
            None => return Ok(None),
            Some("physical") => {}
            Some(other) => bail!("replication slot {name} is a {other} slot, not a physical one (drop it or choose another name)"),
        }
        let lsn = row[1].as_deref().map(parse_lsn).transpose()?;
        let tli = row[2]
            .as_deref()
            .map(|t| {
                t.parse::<u32>()
                    .context("READ_REPLICATION_SLOT: bad timeline")
            })
            .transpose()?;
        Ok(Some((lsn, tli)))
    }

    /// START_REPLICATION [SLOT `slot`] PHYSICAL `start` TIMELINE `timeline`:
    /// the connection becomes a WAL stream.
    pub async fn start_physical(
        mut self,
        slot: Option<&str>,
        start: u64,
        timeline: u32,
    ) -> anyhow::Result<WalStream> {
        self.check_idle()?;
        let slot_clause = match slot {
            Some(s) => {
                check_slot_name(s)?;
                format!("SLOT {s} ")
            }
            None => String::new(),
        };
        let sql = format!(
            "START_REPLICATION {slot_clause}PHYSICAL {} TIMELINE {timeline}",
            format_lsn(start)
        );
        frontend::query(&sql, &mut self.wbuf)?;
        let mut error = None;
        loop {
            match self.recv().await? {
                Msg::CopyBoth => {
                    return Ok(WalStream {
                        conn: self,
                        state: StreamState::Streaming,
                    })
                }
                // At the exact end of an old timeline the server skips COPY
                // and answers with the next timeline right away.
                Msg::Pg(backend::Message::RowDescription(_)) if error.is_none() => {
                    return Ok(WalStream {
                        conn: self,
                        state: StreamState::Draining { next: None },
                    })
                }
                Msg::Pg(backend::Message::ErrorResponse(body)) => {
                    error.get_or_insert(PgError::from_fields(body.fields()));
                }
                Msg::Pg(backend::Message::ReadyForQuery(_)) => {
                    let e = error.unwrap_or_else(|| PgError {
                        severity: "ERROR".into(),
                        code: "XX000".into(),
                        message: "the server did not start streaming".into(),
                        detail: None,
                        hint: None,
                    });
                    return Err(anyhow::Error::new(e))
                        .with_context(|| format!("PostgreSQL {}: {sql}", self.who));
                }
                Msg::Pg(_) => {}
            }
        }
    }

    /// BASE_BACKUP (LABEL `label`, CHECKPOINT 'fast', WAIT false, MANIFEST
    /// 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP true, PROGRESS
    /// false): PostgreSQL 15's syntax. Returns once the server has sent the
    /// start position and the tablespace list; then read the data with
    /// [`Conn::next_backup_chunk`] and end with [`Conn::finish_base_backup`].
    pub async fn start_base_backup(&mut self, label: &str) -> anyhow::Result<BackupStart> {
        self.check_idle()?;
        let sql = format!(
            "BASE_BACKUP (LABEL '{}', CHECKPOINT 'fast', WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP true, PROGRESS false)",
            label.replace('\'', "''")
        );
        frontend::query(&sql, &mut self.wbuf)?;
        // Result set 1: the start position; result set 2: the tablespaces.
        let mut sets: Vec<RawRows> = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Msg::Pg(backend::Message::RowDescription(_)) => sets.push(Vec::new()),
                Msg::Pg(backend::Message::DataRow(body)) => {
                    let row = data_row(&body)?;
                    match sets.last_mut() {
                        Some(set) => set.push(row),
                        None => bail!("BASE_BACKUP: a row before its description"),
                    }
                }
                Msg::Pg(backend::Message::CopyOutResponse(_)) => break,
                Msg::Pg(backend::Message::ErrorResponse(body)) => {
                    error.get_or_insert(PgError::from_fields(body.fields()));
                }
                Msg::Pg(backend::Message::ReadyForQuery(_)) => {
                    let e = error
                        .map(anyhow::Error::new)
                        .unwrap_or_else(|| anyhow!("the server sent no data"));
                    return Err(e).with_context(|| format!("PostgreSQL {}: BASE_BACKUP", self.who));
                }
                Msg::Pg(_) => {}
                Msg::CopyBoth => bail!("BASE_BACKUP: unexpected CopyBothResponse"),
            }
        }
        self.backup = BackupState::Copying;
        let start = sets
            .first()
            .and_then(|s| s.first())
            .ok_or_else(|| anyhow!("BASE_BACKUP: no start position"))?;
        let (start_lsn, timeline) = lsn_tli(start, "BASE_BACKUP start")?;
        let mut tablespaces = Vec::new();
        for row in sets.get(1).into_iter().flatten() {
            // The data directory comes as a row with a NULL oid.
            if let (Some(Some(oid)), Some(Some(path))) = (row.first(), row.get(1)) {
                let oid = std::str::from_utf8(oid)
                    .ok()
                    .and_then(|o| o.parse().ok())
                    .ok_or_else(|| anyhow!("BASE_BACKUP: bad tablespace oid"))?;
                tablespaces.push((oid, String::from_utf8_lossy(path).into_owned()));
            }
        }
        Ok(BackupStart {
            start_lsn,
            timeline,
            tablespaces,
        })
    }

    /// The next piece of the running base backup; `None` at the end of the
    /// copy (then call [`Conn::finish_base_backup`]).
    pub async fn next_backup_chunk(&mut self) -> anyhow::Result<Option<BackupChunk>> {
        match self.backup {
            BackupState::Copying => {}
            BackupState::CopyDone => return Ok(None),
            BackupState::None => bail!("no base backup is running on this connection"),
        }
        match self.recv().await? {
            Msg::Pg(backend::Message::CopyData(body)) => {
                let mut data = body.into_bytes();
                if data.is_empty() {
                    bail!("BASE_BACKUP: an empty CopyData message");
                }
                let kind = data.get_u8();
                Ok(Some(match kind {
                    b'd' => BackupChunk::Data(data),
                    b'n' => {
                        let name = take_cstr(&mut data)?;
                        let path = take_cstr(&mut data)?;
                        BackupChunk::Archive {
                            name,
                            tablespace_path: (!path.is_empty()).then_some(path),
                        }
                    }
                    b'm' => BackupChunk::Manifest,
                    b'p' => {
                        if data.len() < 8 {
                            bail!("BASE_BACKUP: short progress message");
                        }
                        BackupChunk::Progress(data.get_u64())
                    }
                    other => bail!("BASE_BACKUP: unknown CopyData type {:?}", other as char),
                }))
            }
            Msg::Pg(backend::Message::CopyDone) => {
                self.backup = BackupState::CopyDone;
                Ok(None)
            }
            Msg::Pg(backend::Message::ErrorResponse(body)) => {
                let e = PgError::from_fields(body.fields());
                self.backup = BackupState::None;
                self.drain_to_ready().await?;
                Err(anyhow::Error::new(e))
                    .with_context(|| format!("PostgreSQL {}: BASE_BACKUP failed", self.who))
            }
            other => bail!(
                "BASE_BACKUP: unexpected message {} in the copy",
                describe(&other)
            ),
        }
    }

    /// After [`Conn::next_backup_chunk`] returned `None`: the end position
    /// and ReadyForQuery.
    pub async fn finish_base_backup(&mut self) -> anyhow::Result<BackupEnd> {
        if self.backup != BackupState::CopyDone {
            bail!("finish_base_backup: read the backup to its end first (next_backup_chunk returns None)");
        }
        let mut last = None;
        let mut error = None;
        loop {
            match self.recv().await? {
                Msg::Pg(backend::Message::DataRow(body)) => last = Some(data_row(&body)?),
                Msg::Pg(backend::Message::ErrorResponse(body)) => {
                    error.get_or_insert(PgError::from_fields(body.fields()));
                }
                Msg::Pg(backend::Message::ReadyForQuery(_)) => break,
                Msg::Pg(_) => {}
                Msg::CopyBoth => bail!("BASE_BACKUP: unexpected CopyBothResponse"),
            }
        }
        self.backup = BackupState::None;
        if let Some(e) = error {
            return Err(anyhow::Error::new(e)).with_context(|| {
                format!("PostgreSQL {}: BASE_BACKUP failed at its end", self.who)
            });
        }
        let row = last.ok_or_else(|| anyhow!("BASE_BACKUP: no end position"))?;
        let (end_lsn, timeline) = lsn_tli(&row, "BASE_BACKUP end")?;
        Ok(BackupEnd { end_lsn, timeline })
    }

    /// Say goodbye (Terminate) and close; errors are ignored.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    async fn drain_to_ready(&mut self) -> anyhow::Result<()> {
        loop {
            if let Msg::Pg(backend::Message::ReadyForQuery(_)) = self.recv().await? {
                return Ok(());
            }
        }
    }

    /// Write what is buffered (cancel-safe: what was written leaves `wbuf`).
    async fn flush(&mut self) -> anyhow::Result<()> {
        while self.wbuf.has_remaining() {
            self.io
                .write_buf(&mut self.wbuf)
                .await
                .with_context(|| format!("writing to PostgreSQL {}", self.who))?;
        }
        self.io.flush().await?;
        Ok(())
    }

    /// The next message, after writing what is buffered. Notices are logged
    /// at debug; ParameterStatus and notifications are skipped.
    async fn recv(&mut self) -> anyhow::Result<Msg> {
        self.flush().await?;
        loop {
            let msg = match self.parse_buffered()? {
                Some(m) => m,
                None => {
                    // Read in large pieces (WAL streams fast), not the
                    // 64 bytes BytesMut adds when full.
                    self.rbuf.reserve(READ_CHUNK);
                    let n = self
                        .io
                        .read_buf(&mut self.rbuf)
                        .await
                        .with_context(|| format!("reading from PostgreSQL {}", self.who))?;
                    if n == 0 {
                        bail!("PostgreSQL {} closed the connection", self.who);
                    }
                    continue;
                }
            };
            match msg {
                Msg::Pg(backend::Message::NoticeResponse(body)) => {
                    let mut fields = body.fields();
                    let mut text = String::new();
                    while let Ok(Some(f)) = fields.next() {
                        if f.type_() == b'M' {
                            text = String::from_utf8_lossy(f.value_bytes()).into_owned();
                        }
                    }
                    tracing::debug!("PostgreSQL {} notice: {text}", self.who);
                }
                Msg::Pg(backend::Message::ParameterStatus(_))
                | Msg::Pg(backend::Message::NotificationResponse(_)) => {}
                m => return Ok(m),
            }
        }
    }

    /// One whole message from `rbuf`, if there is one.
    fn parse_buffered(&mut self) -> anyhow::Result<Option<Msg>> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.rbuf[0];
        let len =
            u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]) as usize;
        if len < 4 {
            bail!("PostgreSQL {}: bad message length {len}", self.who);
        }
        if self.rbuf.len() < len + 1 {
            self.rbuf.reserve(len + 1 - self.rbuf.len());
            return Ok(None);
        }
        if tag == COPY_BOTH_RESPONSE_TAG {
            self.rbuf.advance(len + 1);
            return Ok(Some(Msg::CopyBoth));
        }
        match backend::Message::parse(&mut self.rbuf) {
            Ok(Some(m)) => Ok(Some(Msg::Pg(m))),
            Ok(None) => Ok(None),
            Err(e) => Err(anyhow!(
                "PostgreSQL {}: cannot parse message {:?}: {e}",
                self.who,
                tag as char
            )),
        }
    }
}

/// Where a [`WalStream`] is; kept in the stream so `next` is cancel-safe.
enum StreamState {
    Streaming,
    /// The server ended the COPY; our CopyDone is queued.
    Draining {
        next: Option<(u32, u64)>,
    },
    Ended,
}

/// A physical replication stream (START_REPLICATION's CopyBoth mode). The
/// server drops a client that sends no status update for
/// `wal_sender_timeout` (60 s by default): answer keepalives that ask for a
/// reply, and report progress regularly.
pub struct WalStream {
    conn: Conn,
    state: StreamState,
}

impl WalStream {
    /// The next message: XLogData (`Data`, `start` = its dataStart),
    /// keepalives, or `End` when the server ended the COPY (a timeline
    /// switch: `next_timeline` from the result set that follows, after we
    /// answered with our CopyDone; a shutdown: `None`).
    pub async fn next(&mut self) -> anyhow::Result<WalMsg> {
        loop {
            match &mut self.state {
                StreamState::Streaming => match self.conn.recv().await? {
                    Msg::Pg(backend::Message::CopyData(body)) => {
                        return parse_wal_msg(body.into_bytes());
                    }
                    Msg::Pg(backend::Message::CopyDone) => {
                        frontend::copy_done(&mut self.conn.wbuf);
                        self.state = StreamState::Draining { next: None };
                    }
                    // A walsender at shutdown ends with "COPY 0" and closes.
                    Msg::Pg(backend::Message::CommandComplete(_)) => {
                        self.state = StreamState::Ended;
                        return Ok(WalMsg::End {
                            next_timeline: None,
                        });
                    }
                    Msg::Pg(backend::Message::ErrorResponse(body)) => {
                        let e = PgError::from_fields(body.fields());
                        self.state = StreamState::Ended;
                        return Err(anyhow::Error::new(e))
                            .with_context(|| format!("PostgreSQL {}: WAL stream", self.conn.who));
                    }
                    other => bail!("WAL stream: unexpected message {}", describe(&other)),
                },
                StreamState::Draining { next } => match self.conn.recv().await? {
                    Msg::Pg(backend::Message::DataRow(body)) => {
                        let row = data_row(&body)?;
                        *next = Some(lsn_tli_rev(&row)?);
                    }
                    Msg::Pg(backend::Message::ReadyForQuery(_)) => {
                        let next_timeline = *next;
                        self.state = StreamState::Ended;
                        return Ok(WalMsg::End { next_timeline });
                    }
                    Msg::Pg(backend::Message::ErrorResponse(body)) => {
                        let e = PgError::from_fields(body.fields());
                        return Err(anyhow::Error::new(e)).with_context(|| {
                            format!("PostgreSQL {}: end of the WAL stream", self.conn.who)
                        });
                    }
                    // RowDescription, CommandComplete, a late CopyData.
                    Msg::Pg(_) => {}
                    Msg::CopyBoth => bail!("WAL stream: unexpected CopyBothResponse"),
                },
                StreamState::Ended => {
                    bail!("the WAL stream has ended (into_conn to start another)")
                }
            }
        }
    }

    /// Send a standby status update: WAL written, flushed (durable: the
    /// slot's restart_lsn follows it, so report only what is safe) and
    /// applied up to these LSNs; `reply`: ask the server for a keepalive.
    pub async fn send_status(
        &mut self,
        write: u64,
        flush: u64,
        apply: u64,
        reply: bool,
    ) -> anyhow::Result<()> {
        if !matches!(self.state, StreamState::Streaming) {
            bail!("the WAL stream has ended: no status updates");
        }
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_US;
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(write);
        msg.put_u64(flush);
        msg.put_u64(apply);
        msg.put_i64(now_us);
        msg.put_u8(u8::from(reply));
        frontend::CopyData::new(msg.freeze())?.write(&mut self.conn.wbuf);
        self.conn.flush().await
    }

    /// The connection, back in normal mode after `End` (to start the next
    /// timeline). Before `End` the connection is still streaming and useless.
    pub fn into_conn(self) -> Conn {
        self.conn
    }
}

/// Parse a CopyData payload of a physical stream.
fn parse_wal_msg(mut b: Bytes) -> anyhow::Result<WalMsg> {
    if b.is_empty() {
        bail!("WAL stream: an empty CopyData message");
    }
    match b.get_u8() {
        b'w' => {
            if b.len() < 24 {
                bail!("WAL stream: short XLogData message");
            }
            let start = b.get_u64();
            let _wal_end = b.get_u64();
            let _send_time = b.get_i64();
            Ok(WalMsg::Data { start, data: b })
        }
        b'k' => {
            if b.len() < 17 {
                bail!("WAL stream: short keepalive message");
            }
            let wal_end = b.get_u64();
            let _send_time = b.get_i64();
            let reply = b.get_u8() != 0;
            Ok(WalMsg::Keepalive { wal_end, reply })
        }
        other => bail!("WAL stream: unknown message type {:?}", other as char),
    }
}

/// The cells of a DataRow.
fn data_row(body: &backend::DataRowBody) -> anyhow::Result<Vec<Option<Bytes>>> {
    let buf = body.buffer_bytes();
    let mut ranges = body.ranges();
    let mut row = Vec::new();
    while let Some(r) = ranges.next()? {
        row.push(r.map(|r| buf.slice(r)));
    }
    Ok(row)
}

/// A (LSN text, timeline) row.
fn lsn_tli(row: &[Option<Bytes>], what: &str) -> anyhow::Result<(u64, u32)> {
    let text = |i: usize| -> anyhow::Result<&str> {
        row.get(i)
            .and_then(|c| c.as_deref())
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| anyhow!("{what}: missing column {i}"))
    };
    let lsn = parse_lsn(text(0)?)?;
    let tli = text(1)?
        .parse()
        .with_context(|| format!("{what}: bad timeline"))?;
    Ok((lsn, tli))
}

/// A (timeline, LSN text) row: the next timeline after a stream ended.
fn lsn_tli_rev(row: &[Option<Bytes>]) -> anyhow::Result<(u32, u64)> {
    let text = |i: usize| -> anyhow::Result<&str> {
        row.get(i)
            .and_then(|c| c.as_deref())
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| {
                anyhow!("end of the WAL stream: missing column {i} of the next timeline")
            })
    };
    let tli = text(0)?
        .parse()
        .context("end of the WAL stream: bad next timeline")?;
    Ok((tli, parse_lsn(text(1)?)?))
}

fn one_row<'a>(
    rows: &'a [Vec<Option<String>>],
    cols: usize,
    what: &str,
) -> anyhow::Result<&'a [Option<String>]> {
    match rows {
        [row] if row.len() >= cols => Ok(row),
        _ => bail!("{what}: unexpected answer ({} rows)", rows.len()),
    }
}

fn cell<'a>(row: &'a [Option<String>], i: usize, name: &str) -> anyhow::Result<&'a str> {
    row.get(i)
        .and_then(|c| c.as_deref())
        .ok_or_else(|| anyhow!("missing {name}"))
}

/// A NUL-terminated string at the front of `b`.
fn take_cstr(b: &mut Bytes) -> anyhow::Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| anyhow!("BASE_BACKUP: unterminated string"))?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Ok(s)
}

/// Replication slot names: what PostgreSQL accepts (lower-case letters,
/// digits, underscore; at most 63), checked here because they are spliced
/// into commands.
fn check_slot_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("bad replication slot name {name:?}: use 1 to 63 lower-case letters, digits and underscores");
    }
    Ok(())
}

/// The first line of `sql`, shortened, for errors.
fn short(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or_default();
    if line.len() > 80 || sql.lines().nth(1).is_some() {
        let mut end = line.len().min(80);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &line[..end])
    } else {
        line.to_string()
    }
}

/// A message's name, for errors.
fn describe(m: &Msg) -> &'static str {
    use backend::Message as M;
    match m {
        Msg::CopyBoth => "CopyBothResponse",
        Msg::Pg(m) => match m {
            M::AuthenticationOk => "AuthenticationOk",
            M::BackendKeyData(_) => "BackendKeyData",
            M::CommandComplete(_) => "CommandComplete",
            M::CopyData(_) => "CopyData",
            M::CopyDone => "CopyDone",
            M::CopyInResponse(_) => "CopyInResponse",
            M::CopyOutResponse(_) => "CopyOutResponse",
            M::DataRow(_) => "DataRow",
            M::EmptyQueryResponse => "EmptyQueryResponse",
            M::ErrorResponse(_) => "ErrorResponse",
            M::ReadyForQuery(_) => "ReadyForQuery",
            M::RowDescription(_) => "RowDescription",
            _ => "another message",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns() {
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(parse_lsn("0/0").unwrap(), 0);
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF").unwrap(), u64::MAX);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0x0100_0028), "0/1000028");
        for bad in ["", "16", "16/", "/1", "x/1", "1/123456789", "1/2/3"] {
            assert!(parse_lsn(bad).is_err(), "{bad}");
        }
        for l in [0u64, 1, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(l)).unwrap(), l);
        }
    }

    #[test]
    fn wal_messages() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x100);
        b.put_u64(0x200);
        b.put_i64(7);
        b.put_slice(b"abc");
        assert_eq!(
            parse_wal_msg(b.freeze()).unwrap(),
            WalMsg::Data {
                start: 0x100,
                data: Bytes::from_static(b"abc")
            }
        );
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x300);
        b.put_i64(7);
        b.put_u8(1);
        assert_eq!(
            parse_wal_msg(b.freeze()).unwrap(),
            WalMsg::Keepalive {
                wal_end: 0x300,
                reply: true
            }
        );
        assert!(parse_wal_msg(Bytes::from_static(b"w123")).is_err());
        assert!(parse_wal_msg(Bytes::from_static(b"z")).is_err());
    }

    #[test]
    fn slot_names() {
        assert!(check_slot_name("offsite_1").is_ok());
        for bad in ["", "A", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_read_well() {
        let e = PgError {
            severity: "ERROR".into(),
            code: "42601".into(),
            message: "syntax error".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            e.to_string(),
            "ERROR 42601: syntax error (detail: d) (hint: h)"
        );
    }
}
