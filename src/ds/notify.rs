//! Notifications: [`Listener::listen`] on a [`super::Kv`], [`super::Queue`],
//! [`super::File`] or [`super::Log`] path, then
//! [`Listener::subscribe`] to the kinds of operations to hear about.
//!
//! Everything lives in the pool next to the object, built from one-sided operations:
//!
//! - a **listener count** in word [`LISTENERS`] of the object's meta block;
//! - an **event log** at `<path>/events`, a [`Log`] whose stream ids are event kinds;
//! - a **listener table** at `<path>/listeners`: one meta block whose slots hold each
//!   listener's owner word (a random tag and a heartbeat in wall-clock milliseconds) and
//!   its cursor in the event log, so that entries every live listener has passed are
//!   trimmed, and listeners that stopped heartbeating are dropped.
//!
//! Writers keep a per-handle copy of the count, refreshed at most every refresh interval
//! (default 50 ms); while it is zero an operation costs nothing extra, and while it is
//! positive each completed operation appends one event. `subscribe` raises the count and
//! then waits longer than the refresh interval, so that every operation that completes
//! after it returns is published. See `docs/DATA_STRUCTURES.md`, "Notifications".

use super::log::Log;
use super::object::Object;
use super::{is_stale, DsError};
use crate::client::{BlockHandle, Client};
use crate::proto::PoolPath;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Word of an object's meta block that counts its subscribed listeners (as a signed
/// number: a decrement racing an increment may make it briefly negative). Every object
/// kind that can be listened to keeps this word free.
pub(crate) const LISTENERS: u64 = 56;
/// Child path of the event log.
const EVENTS: &str = "events";
/// Child path of the listener table.
const TABLE: &str = "listeners";
const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"FPLSTN01");
/// Listener-table word: the lease in milliseconds (fixed by the table's creator).
const LEASE_MS: u64 = 8;
/// First listener slot: owner word, then cursor word.
const SLOT0: u64 = 64;
const SLOT_BYTES: u64 = 16;
/// Most listeners subscribed to one object at a time.
pub const MAX_LISTENERS: u64 = 32;
/// Most bytes of a key or item an event carries (longer ones are cut to this prefix;
/// [`Notification::len`] tells the full length).
pub const EVENT_DATA_MAX: usize = 1024;
/// Default writer refresh interval of the listener count.
pub const DEFAULT_REFRESH: Duration = Duration::from_millis(50);
/// How often a publishing writer handle trims the event log and drops expired listeners.
const WRITER_HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Heartbeats are wall-clock milliseconds in the low 48 bits of the owner word.
const MS_BITS: u32 = 48;
const MS_MASK: u64 = (1 << MS_BITS) - 1;

/// The kinds of operations a listener can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A Kv `put`, `update` or `upsert` stored a value (event data: the key).
    Put,
    /// A Kv `remove` removed a key (event data: the key).
    Remove,
    /// A Queue `enqueue` appended an item (event data: the item).
    Enqueue,
    /// A Queue `dequeue` took an item (event data: the item).
    Dequeue,
    /// A File `append` or Log `append` completed (event data: the bytes appended;
    /// [`Notification::at`]: the file offset or log position).
    Append,
}

impl EventKind {
    /// The event log stream of this kind.
    fn stream(self) -> u32 {
        match self {
            EventKind::Put => 1,
            EventKind::Remove => 2,
            EventKind::Enqueue => 3,
            EventKind::Dequeue => 4,
            EventKind::Append => 5,
        }
    }

    fn from_stream(s: u32) -> Option<EventKind> {
        Some(match s {
            1 => EventKind::Put,
            2 => EventKind::Remove,
            3 => EventKind::Enqueue,
            4 => EventKind::Dequeue,
            5 => EventKind::Append,
            _ => return None,
        })
    }
}

/// One delivered event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// What happened.
    pub kind: EventKind,
    /// The key (Put, Remove) or item (Enqueue, Dequeue), cut to [`EVENT_DATA_MAX`] bytes.
    pub data: Vec<u8>,
    /// The full length of the key or item.
    pub len: u64,
    /// For Append events, where the bytes went: the file offset, or the log position
    /// the append returned. `None` for other kinds.
    pub at: Option<u64>,
    /// The event's position in the object's event log (increases with publication order).
    pub position: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        & MS_MASK
}

fn events_path(path: &PoolPath) -> Result<PoolPath, DsError> {
    Ok(path.join(EVENTS)?)
}

/// The listener table of an object.
struct Table {
    obj: Object,
    lease_ms: u64,
    slots: u64,
}

impl Table {
    fn create(client: &Client, object: &PoolPath, lease: Duration) -> Result<Table, DsError> {
        let lease_ms = (lease.as_millis() as u64).max(1);
        let obj = Object::create(
            client,
            object.join(TABLE)?,
            "listener table",
            TABLE_MAGIC,
            "x",
            |_| Ok(vec![(LEASE_MS, lease_ms)]),
        )?;
        Self::from_object(obj)
    }

    fn open(client: &Client, object: &PoolPath) -> Result<Table, DsError> {
        let obj = Object::open(
            client,
            object.join(TABLE)?,
            "listener table",
            TABLE_MAGIC,
            "x",
        )?;
        Self::from_object(obj)
    }

    fn from_object(obj: Object) -> Result<Table, DsError> {
        let lease_ms = obj.word(LEASE_MS)?;
        let slots = (obj.block_len().saturating_sub(SLOT0) / SLOT_BYTES).min(MAX_LISTENERS);
        if lease_ms == 0 || slots == 0 {
            return Err(DsError::Corrupt {
                path: obj.path().clone(),
                what: format!("lease {lease_ms} ms, {slots} listener slots"),
            });
        }
        Ok(Table {
            obj,
            lease_ms,
            slots,
        })
    }

    fn owner_off(i: u64) -> u64 {
        SLOT0 + SLOT_BYTES * i
    }

    fn cursor_off(i: u64) -> u64 {
        SLOT0 + SLOT_BYTES * i + 8
    }

    /// Every slot's owner word and cursor, each read atomically (FAA of 0).
    fn read(&self) -> Result<Vec<(u64, u64)>, DsError> {
        let meta = self.obj.meta();
        let mut ops = Vec::with_capacity(2 * self.slots as usize);
        for i in 0..self.slots {
            ops.push(meta.faa_op(Self::owner_off(i), 0)?);
            ops.push(meta.faa_op(Self::cursor_off(i), 0)?);
        }
        meta.execute(&mut ops)?;
        Ok(ops.chunks(2).map(|p| (p[0].result, p[1].result)).collect())
    }

    fn expired(&self, owner: u64, now: u64) -> bool {
        now.saturating_sub(owner & MS_MASK) > self.lease_ms
    }

    /// Claims a free slot for a new listener: `(slot, owner word)`.
    fn claim(&self, count: &BlockHandle) -> Result<Option<(u64, u64)>, DsError> {
        let tag = u64::from(rand::random::<u16>().max(1)) << MS_BITS;
        for (i, (owner, _)) in self.read()?.into_iter().enumerate() {
            let i = i as u64;
            let now = now_ms();
            if owner != 0 && !self.expired(owner, now) {
                continue;
            }
            let mine = tag | now;
            let found = self.obj.meta().cas(Self::owner_off(i), owner, mine)?;
            if found == owner {
                if owner != 0 {
                    // We took over an expired listener's slot: its count goes with it.
                    count.faa(LISTENERS, u64::MAX)?;
                }
                return Ok(Some((i, mine)));
            }
        }
        Ok(None)
    }

    /// Renews slot `i`'s heartbeat: the new owner word, or `None` when the slot was
    /// taken from us (our lease expired).
    fn beat(&self, i: u64, owner: u64) -> Result<Option<u64>, DsError> {
        let mine = (owner & !MS_MASK) | now_ms();
        let found = self.obj.meta().cas(Self::owner_off(i), owner, mine)?;
        Ok((found == owner).then_some(mine))
    }

    /// Raises slot `i`'s cursor to `pos` (cursors only grow, across owners too: every
    /// cursor is a position the log had reached, and a new owner starts at the end).
    fn advance(&self, i: u64, pos: u64) -> Result<(), DsError> {
        let meta = self.obj.meta();
        let off = Self::cursor_off(i);
        let mut cur = meta.faa(off, 0)?;
        while cur < pos {
            let found = meta.cas(off, cur, pos)?;
            if found == cur {
                break;
            }
            cur = found;
        }
        Ok(())
    }

    /// Frees slot `i` if we still own it; returns whether we did.
    fn release(&self, i: u64, owner: u64) -> Result<bool, DsError> {
        Ok(self.obj.meta().cas(Self::owner_off(i), owner, 0)? == owner)
    }

    /// Drops expired listeners (their slots freed, the count lowered once per slot) and
    /// trims the event log up to the least cursor of the live ones (or its end, if none).
    fn housekeep(&self, log: &Log, count: &BlockHandle) -> Result<(), DsError> {
        // The end first: a listener claiming a slot after the slots are read starts
        // at an end read later, so at or past this one.
        let end = log.end()?;
        let now = now_ms();
        let mut upto = end;
        for (i, (owner, cursor)) in self.read()?.into_iter().enumerate() {
            if owner == 0 {
                continue;
            }
            if self.expired(owner, now) {
                if self.obj.meta().cas(Self::owner_off(i as u64), owner, 0)? == owner {
                    count.faa(LISTENERS, u64::MAX)?;
                }
                continue;
            }
            upto = upto.min(cursor);
        }
        if upto > log.start()? {
            match log.trim(upto) {
                Ok(()) | Err(DsError::Trimmed { .. }) => {}
                Err(DsError::Client(e)) if is_stale(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The writer side, held by every Kv, Queue, File and Log handle.
pub(crate) struct Publisher {
    client: Client,
    path: PoolPath,
    meta: BlockHandle,
    state: Mutex<PubState>,
}

struct PubState {
    refresh: Duration,
    /// Listener count as last read, and when the read was issued.
    listeners: i64,
    checked: Option<Instant>,
    log: Option<Arc<Log>>,
    table: Option<Arc<Table>>,
    housekept: Option<Instant>,
}

impl Publisher {
    pub(crate) fn new(obj: &Object, client: &Client) -> Publisher {
        Publisher {
            client: client.clone(),
            path: obj.path().clone(),
            meta: obj.meta().clone(),
            state: Mutex::new(PubState {
                refresh: DEFAULT_REFRESH,
                listeners: 0,
                checked: None,
                log: None,
                table: None,
                housekept: None,
            }),
        }
    }

    pub(crate) fn set_refresh(&self, refresh: Duration) {
        let mut st = self.state.lock();
        st.refresh = refresh;
        st.checked = None;
    }

    /// Publishes one completed operation if anyone listens. Call only after the
    /// operation completed.
    pub(crate) fn publish(&self, kind: EventKind, data: &[u8]) -> Result<(), DsError> {
        self.publish_at(kind, data, None)
    }

    /// [`Publisher::publish`] with the object position the operation used.
    pub(crate) fn publish_at(
        &self,
        kind: EventKind,
        data: &[u8],
        at: Option<u64>,
    ) -> Result<(), DsError> {
        self.try_publish(kind, data, at)
            .map_err(|e| DsError::NotPublished {
                path: self.path.clone(),
                source: Box::new(e),
            })
    }

    fn try_publish(&self, kind: EventKind, data: &[u8], at: Option<u64>) -> Result<(), DsError> {
        let now = Instant::now();
        let (log, housekeep) = {
            let mut st = self.state.lock();
            if st
                .checked
                .map_or(true, |t| now.duration_since(t) >= st.refresh)
            {
                // The instant before the read: the value read is at least this recent.
                let at = Instant::now();
                st.listeners = self.meta.faa(LISTENERS, 0)? as i64;
                st.checked = Some(at);
            }
            if st.listeners <= 0 {
                return Ok(());
            }
            let log = match &st.log {
                Some(l) => l.clone(),
                None => {
                    let l = Arc::new(Log::open_quiet(
                        &self.client,
                        events_path(&self.path)?.as_str(),
                    )?);
                    st.log = Some(l.clone());
                    l
                }
            };
            let due = st
                .housekept
                .map_or(true, |t| now.duration_since(t) >= WRITER_HOUSEKEEPING);
            if due {
                st.housekept = Some(now);
            }
            (log, due)
        };
        let len = data.len() as u64;
        let mut payload = Vec::with_capacity(16 + data.len().min(EVENT_DATA_MAX));
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&at.unwrap_or(u64::MAX).to_le_bytes());
        payload.extend_from_slice(&data[..data.len().min(EVENT_DATA_MAX)]);
        match log.append(&payload, &[kind.stream()]) {
            Ok(_) => {}
            // The block under our entry was freed: a trim passed it, which happens only
            // when no live listener's cursor lies before it, so nobody will read it.
            Err(DsError::Client(e)) if is_stale(&e) => {}
            Err(DsError::Corrupt { .. }) if log.start()? > 0 => {}
            Err(e) => return Err(e),
        }
        if housekeep {
            self.housekeep(&log)?;
        }
        Ok(())
    }

    /// Lets a crashed listener cost nothing forever: drops expired listeners and trims.
    fn housekeep(&self, log: &Log) -> Result<(), DsError> {
        let table = {
            let cached = self.state.lock().table.clone();
            match cached {
                Some(t) => t,
                None => {
                    let t = match Table::open(&self.client, &self.path) {
                        Ok(t) => Arc::new(t),
                        Err(DsError::NotFound { .. }) => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    self.state.lock().table = Some(t.clone());
                    t
                }
            }
        };
        table.housekeep(log, &self.meta)
    }
}

/// Settings of a [`Listener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The longest refresh interval of any writer handle of the object
    /// (`Kv::set_notify_refresh`, `Queue::set_notify_refresh`; default 50 ms).
    /// `subscribe` waits longer than this before it returns.
    pub writer_refresh: Duration,
    /// How long a listener may go without a heartbeat (a `next` call) before others
    /// drop it. Applies when this listener creates the object's listener table; the
    /// first creator's lease stays. Default 30 s.
    pub lease: Duration,
    /// How often `next` renews the heartbeat, publishes the cursor and trims the event
    /// log. Must be under half the lease. Default 200 ms.
    pub housekeeping: Duration,
    /// Longest sleep between two polls of the event log in `next`. Default 5 ms.
    pub max_poll: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            writer_refresh: DEFAULT_REFRESH,
            lease: Duration::from_secs(30),
            housekeeping: Duration::from_millis(200),
            max_poll: Duration::from_millis(5),
        }
    }
}

/// A listener on a Kv, Queue, File or Log: [`Listener::subscribe`] to kinds of events, then
/// [`Listener::next`] returns them, each once, in the order they were published.
///
/// ```no_run
/// # fn main() -> Result<(), farpool::ds::DsError> {
/// use farpool::ds::{EventKind, Listener};
/// use std::time::Duration;
/// let client = farpool::Client::connect("127.0.0.1:7070")?;
/// let mut l = Listener::listen(&client, "/job/map/m0/table")?;
/// l.subscribe(&[EventKind::Put, EventKind::Remove])?;
/// while let Some(ev) = l.next(Duration::from_secs(1))? {
///     println!("{:?} {:?}", ev.kind, ev.data);
/// }
/// # Ok(()) }
/// ```
pub struct Listener {
    path: PoolPath,
    meta: BlockHandle,
    log: Log,
    table: Table,
    config: ListenerConfig,
    streams: Vec<u32>,
    /// Slot index and owner word while subscribed.
    slot: Option<(u64, u64)>,
    cursor: u64,
    pending: VecDeque<Notification>,
    housekept: Instant,
}

/// Creates a listener on the Kv, Queue, File or Log at `path` (see [`Listener::listen`]).
pub fn listen(client: &Client, path: &str) -> Result<Listener, DsError> {
    Listener::listen(client, path)
}

impl Listener {
    /// A listener on the Kv, Queue, File or Log at `path`, with the default configuration. It
    /// hears nothing until [`Listener::subscribe`].
    pub fn listen(client: &Client, path: &str) -> Result<Listener, DsError> {
        Self::listen_with(client, path, ListenerConfig::default())
    }

    /// A listener on the Kv, Queue, File or Log at `path`.
    pub fn listen_with(
        client: &Client,
        path: &str,
        config: ListenerConfig,
    ) -> Result<Listener, DsError> {
        if config.housekeeping.is_zero() || config.housekeeping * 2 >= config.lease {
            return Err(DsError::Config(format!(
                "listener housekeeping every {:?} must be positive and under half the lease {:?}",
                config.housekeeping, config.lease
            )));
        }
        let path = PoolPath::parse(path)?;
        let obj = Object::open_any(
            client,
            path.clone(),
            "kv table, queue, file or log",
            &[
                super::kv::MAGIC,
                super::queue::MAGIC,
                super::file::MAGIC,
                super::log::MAGIC,
            ],
        )?;
        let log = Log::create_quiet(client, events_path(&path)?.as_str())?;
        let table = Table::create(client, &path, config.lease)?;
        Ok(Listener {
            meta: obj.meta().clone(),
            path,
            log,
            table,
            config,
            streams: Vec::new(),
            slot: None,
            cursor: 0,
            pending: VecDeque::new(),
            housekept: Instant::now(),
        })
    }

    /// The object's path.
    pub fn path(&self) -> &PoolPath {
        &self.path
    }

    /// Whether the listener is subscribed.
    pub fn is_subscribed(&self) -> bool {
        self.slot.is_some()
    }

    /// Subscribes to `kinds` (replacing the kinds of an earlier call). When it returns,
    /// every operation of those kinds that completes from then on is delivered by
    /// [`Listener::next`]; none that completed before the first `subscribe` is. Takes
    /// a little longer than the writers' refresh interval.
    pub fn subscribe(&mut self, kinds: &[EventKind]) -> Result<(), DsError> {
        let mut streams: Vec<u32> = kinds.iter().map(|k| k.stream()).collect();
        streams.sort_unstable();
        streams.dedup();
        if streams.is_empty() {
            return Err(DsError::Config(
                "subscribe to at least one event kind (or call unsubscribe)".into(),
            ));
        }
        self.streams = streams;
        if self.slot.is_some() {
            self.pending
                .retain(|n| self.streams.contains(&n.kind.stream()));
            return Ok(());
        }
        // Count first (a crash between the two leaves the count high, which costs
        // writers publishing but no memory: housekeeping trims to the end).
        self.meta.faa(LISTENERS, 1)?;
        let slot = match self.table.claim(&self.meta) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.meta.faa(LISTENERS, u64::MAX)?;
                return Err(DsError::TooManyListeners {
                    path: self.path.clone(),
                    max: self.table.slots,
                });
            }
            Err(e) => {
                let _ = self.meta.faa(LISTENERS, u64::MAX);
                return Err(e);
            }
        };
        self.slot = Some(slot);
        // Every writer re-reads the count within its refresh interval; after this
        // wait each one has seen ours and publishes every operation it completes.
        let r = self.config.writer_refresh;
        std::thread::sleep(r + (r / 4).max(Duration::from_millis(5)));
        let start = self.log.end()?;
        self.table.advance(slot.0, start)?;
        self.cursor = start;
        self.pending.clear();
        self.heartbeat()?;
        self.housekept = Instant::now();
        Ok(())
    }

    /// Stops listening: frees the listener's slot and lowers the count, so writers
    /// stop publishing within their refresh interval (if no one else listens).
    pub fn unsubscribe(&mut self) -> Result<(), DsError> {
        self.pending.clear();
        let Some((i, owner)) = self.slot.take() else {
            return Ok(());
        };
        // Lower the count only if the slot was still ours (else whoever dropped us
        // as expired lowered it).
        if self.table.release(i, owner)? {
            self.meta.faa(LISTENERS, u64::MAX)?;
        }
        Ok(())
    }

    /// The next event, waiting up to `timeout` for one (polling the event log with a
    /// backoff up to [`ListenerConfig::max_poll`]); `None` when none came.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Notification>, DsError> {
        if self.slot.is_none() {
            return Err(DsError::NotSubscribed {
                path: self.path.clone(),
            });
        }
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_micros(50);
        loop {
            if let Some(n) = self.pending.pop_front() {
                return Ok(Some(n));
            }
            if self.housekept.elapsed() >= self.config.housekeeping {
                self.housekeep()?;
            }
            self.poll()?;
            if !self.pending.is_empty() {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(self.config.max_poll.max(Duration::from_micros(50)));
        }
    }

    /// Reads the events published since the cursor.
    fn poll(&mut self) -> Result<(), DsError> {
        let scan = match self.log.scan(self.cursor, u64::MAX, &self.streams) {
            Ok(s) => s,
            Err(DsError::Trimmed { .. }) => return Err(self.expired()),
            Err(e) => return Err(e),
        };
        for e in scan.entries {
            let kind = e.streams.iter().find_map(|s| EventKind::from_stream(*s));
            let word = |i: usize| {
                e.data
                    .get(8 * i..8 * i + 8)
                    .and_then(|w| w.try_into().ok())
                    .map(u64::from_le_bytes)
            };
            let (Some(kind), Some(len), Some(at)) = (kind, word(0), word(1)) else {
                return Err(DsError::Corrupt {
                    path: self.log.path().clone(),
                    what: format!("event at {} has no kind, length or offset", e.position),
                });
            };
            self.pending.push_back(Notification {
                kind,
                data: e.data[16..].to_vec(),
                len,
                at: (at != u64::MAX).then_some(at),
                position: e.position,
            });
        }
        self.cursor = scan.next;
        Ok(())
    }

    fn expired(&mut self) -> DsError {
        self.slot = None;
        self.pending.clear();
        DsError::ListenerExpired {
            path: self.path.clone(),
            lease: Duration::from_millis(self.table.lease_ms),
        }
    }

    fn heartbeat(&mut self) -> Result<(), DsError> {
        let Some((i, owner)) = self.slot else {
            return Ok(());
        };
        match self.table.beat(i, owner)? {
            Some(mine) => {
                self.slot = Some((i, mine));
                Ok(())
            }
            None => Err(self.expired()),
        }
    }

    /// Renews the heartbeat, publishes the cursor, drops expired listeners and trims.
    fn housekeep(&mut self) -> Result<(), DsError> {
        self.housekept = Instant::now();
        self.heartbeat()?;
        if let Some((i, _)) = self.slot {
            self.table.advance(i, self.cursor)?;
        }
        self.table.housekeep(&self.log, &self.meta)
    }

    /// The event log's first untrimmed position and its end (for monitoring and tests).
    pub fn log_bounds(&self) -> Result<(u64, u64), DsError> {
        Ok((self.log.start()?, self.log.end()?))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Err(e) = self.unsubscribe() {
            tracing::debug!(path = %self.path, error = %e, "could not unsubscribe a dropped listener; it expires with its lease");
        }
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("path", &self.path)
            .field("subscribed", &self.slot.is_some())
            .field("cursor", &self.cursor)
            .finish()
    }
}
