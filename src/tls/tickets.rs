//! A bounded, expiring TLS session store for the relay connections (SPEC §7): at most
//! `capacity` resumption tickets (one per pool slot), none older than `max_age`.
//!
//! Why dropping is enough to wipe: in rustls 0.23 both `Tls13ClientSessionValue` and
//! `Tls12ClientSessionValue` keep their secret (the TLS 1.3 resumption PSK, the TLS 1.2
//! master secret) in `ClientSessionCommon::secret: Zeroizing<PayloadU8>` (msgs/persist.rs), so
//! the secret is zeroized when the value is dropped — on eviction, expiry, or when rustls
//! takes a ticket and finishes with it. The ticket bytes themselves are encrypted by the
//! server and useless without that secret; they are not wiped. The values live in ordinary
//! heap memory (locked only with `lock_all`); the wiping allocator also zeroes them on free.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

/// Bounded, expiring `ClientSessionStore`; install with
/// `config.resumption = rustls::client::Resumption::store(store)`.
pub struct TicketStore {
    state: Mutex<State>,
}

struct State {
    sessions: Bounded<Session>,
    /// Advanced by every [`TicketStore::clear`].
    generation: u64,
    kx_hints: VecDeque<(ServerName<'static>, NamedGroup)>,
}

enum Session {
    Tls13(Tls13ClientSessionValue),
    Tls12(Tls12ClientSessionValue),
}

/// Remembered key-exchange groups (not secret) for this many servers.
const MAX_KX_HINTS: usize = 8;

impl TicketStore {
    /// A store holding at most `capacity` sessions (use `pool.size`; 0 disables resumption),
    /// each for at most `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Arc<TicketStore> {
        Arc::new(TicketStore {
            state: Mutex::new(State {
                sessions: Bounded::new(capacity, max_age),
                generation: 0,
                kx_hints: VecDeque::new(),
            }),
        })
    }

    /// Sessions held now (expired ones are dropped first).
    pub fn len(&self) -> usize {
        let mut state = self.lock();
        state.sessions.purge_expired(Instant::now());
        state.sessions.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops (and thereby zeroizes) expired sessions; otherwise that happens on the next
    /// store access. Call it from a periodic task if the pool can sit idle for long.
    pub fn purge_expired(&self) {
        self.lock().sessions.purge_expired(Instant::now());
    }

    /// Drops (and thereby zeroizes) every session and begins a new generation: sessions
    /// that dials begun before learn later are not kept ([`TicketStore::for_dial`]). For
    /// when the client identity changed.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.sessions.clear();
    }

    /// The store as seen by one dial about to start: what that connection learns is kept
    /// only if no [`TicketStore::clear`] came in between, and it resumes only sessions of its
    /// own generation. So a handshake made with a client identity that was replaced while it
    /// ran cannot leave a session behind for a later connection to resume.
    pub fn for_dial(self: &Arc<Self>) -> Arc<dyn ClientSessionStore> {
        let generation = self.lock().generation;
        Arc::new(DialTickets {
            store: Arc::clone(self),
            generation,
        })
    }

    /// Whether `generation` (`None`: whatever is current) is the current one.
    fn current(state: &State, generation: Option<u64>) -> bool {
        generation.is_none_or(|g| g == state.generation)
    }

    fn set_tls12(
        &self,
        generation: Option<u64>,
        server_name: ServerName<'static>,
        value: Tls12ClientSessionValue,
    ) {
        let mut state = self.lock();
        if !Self::current(&state, generation) {
            return;
        }
        let now = Instant::now();
        // One TLS 1.2 session per server, as rustls's own cache keeps.
        drop(state.sessions.take_newest(now, |name, session| {
            name == &server_name && matches!(session, Session::Tls12(_))
        }));
        state
            .sessions
            .insert(now, server_name, Session::Tls12(value));
    }

    fn tls12(
        &self,
        generation: Option<u64>,
        server_name: &ServerName<'_>,
    ) -> Option<Tls12ClientSessionValue> {
        let mut state = self.lock();
        if !Self::current(&state, generation) {
            return None;
        }
        state
            .sessions
            .find_newest(Instant::now(), |name, session| match session {
                Session::Tls12(value) if name == server_name => Some(value.clone()),
                _ => None,
            })
    }

    fn remove_tls12(&self, server_name: &ServerName<'static>) {
        let mut state = self.lock();
        drop(state.sessions.take_newest(Instant::now(), |name, session| {
            name == server_name && matches!(session, Session::Tls12(_))
        }));
    }

    fn insert_tls13(
        &self,
        generation: Option<u64>,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut state = self.lock();
        if Self::current(&state, generation) {
            state
                .sessions
                .insert(Instant::now(), server_name, Session::Tls13(value));
        }
    }

    fn take_tls13(
        &self,
        generation: Option<u64>,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let mut state = self.lock();
        if !Self::current(&state, generation) {
            return None;
        }
        match state.sessions.take_newest(Instant::now(), |name, session| {
            name == server_name && matches!(session, Session::Tls13(_))
        }) {
            Some(Session::Tls13(value)) => Some(value),
            _ => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent if a holder panicked: a queue of owned values.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("TicketStore")
            .field("sessions", &state.sessions.len())
            .field("capacity", &state.sessions.capacity)
            .field("max_age", &state.sessions.max_age)
            .finish()
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        let mut state = self.lock();
        state.kx_hints.retain(|(name, _)| name != &server_name);
        if state.kx_hints.len() == MAX_KX_HINTS {
            state.kx_hints.pop_front();
        }
        state.kx_hints.push_back((server_name, group));
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        let state = self.lock();
        state
            .kx_hints
            .iter()
            .find(|(name, _)| name == server_name)
            .map(|(_, group)| *group)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.set_tls12(None, server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.tls12(None, server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.remove_tls12(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.insert_tls13(None, server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.take_tls13(None, server_name)
    }
}

/// The store as one dial sees it ([`TicketStore::for_dial`]): sessions of the generation the
/// dial began in, and none once [`TicketStore::clear`] has begun another.
struct DialTickets {
    store: Arc<TicketStore>,
    generation: u64,
}

impl fmt::Debug for DialTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DialTickets")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl ClientSessionStore for DialTickets {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.store.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.store.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.store
            .set_tls12(Some(self.generation), server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.store.tls12(Some(self.generation), server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.store.remove_tls12(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.store
            .insert_tls13(Some(self.generation), server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.store.take_tls13(Some(self.generation), server_name)
    }
}

/// The pure core: a FIFO of at most `capacity` values, each expiring `max_age` after it was
/// inserted. Time is passed in. Evicted and expired values are dropped right away.
struct Bounded<V> {
    capacity: usize,
    max_age: Duration,
    entries: VecDeque<Entry<V>>,
}

struct Entry<V> {
    server: ServerName<'static>,
    inserted: Instant,
    value: V,
}

impl<V> Bounded<V> {
    fn new(capacity: usize, max_age: Duration) -> Self {
        Bounded {
            capacity,
            max_age,
            entries: VecDeque::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn clear(&mut self) {
        self.entries.clear();
    }

    /// Adds `value`, evicting the oldest entries beyond capacity (none kept at capacity 0).
    fn insert(&mut self, now: Instant, server: ServerName<'static>, value: V) {
        self.purge_expired(now);
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(Entry {
            server,
            inserted: now,
            value,
        });
    }

    /// Removes and returns the newest unexpired value that `matches`.
    fn take_newest(
        &mut self,
        now: Instant,
        matches: impl Fn(&ServerName<'static>, &V) -> bool,
    ) -> Option<V> {
        self.purge_expired(now);
        let index = self
            .entries
            .iter()
            .rposition(|entry| matches(&entry.server, &entry.value))?;
        self.entries.remove(index).map(|entry| entry.value)
    }

    /// The first `Some` of `select` over unexpired entries, newest first.
    fn find_newest<T>(
        &mut self,
        now: Instant,
        select: impl Fn(&ServerName<'static>, &V) -> Option<T>,
    ) -> Option<T> {
        self.purge_expired(now);
        self.entries
            .iter()
            .rev()
            .find_map(|entry| select(&entry.server, &entry.value))
    }

    fn purge_expired(&mut self, now: Instant) {
        let max_age = self.max_age;
        self.entries
            .retain(|entry| now.saturating_duration_since(entry.inserted) < max_age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::test_support::{client_config, handshake, pki, server_config};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    /// A stand-in ticket that counts its drops (the real ones zeroize on drop).
    #[derive(Debug)]
    struct Ticket(u32);

    impl Drop for Ticket {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn relay() -> ServerName<'static> {
        ServerName::try_from("relay.test").unwrap()
    }

    #[test]
    fn holds_at_most_capacity_and_drops_the_oldest() {
        let start = Instant::now();
        let mut store = Bounded::new(2, Duration::from_secs(600));
        let before = DROPPED.load(Ordering::SeqCst);
        for n in 0..5 {
            store.insert(start, relay(), Ticket(n));
        }
        assert_eq!(store.len(), 2);
        assert!(DROPPED.load(Ordering::SeqCst) - before >= 3);
        let newest = store.take_newest(start, |_, _| true).unwrap();
        assert_eq!(newest.0, 4);
        assert_eq!(store.take_newest(start, |_, _| true).unwrap().0, 3);
        assert!(store.take_newest(start, |_, _| true).is_none());
    }

    #[test]
    fn expires_entries_after_max_age() {
        let start = Instant::now();
        let mut store = Bounded::new(4, Duration::from_secs(60));
        store.insert(start, relay(), Ticket(1));
        store.insert(start + Duration::from_secs(30), relay(), Ticket(2));
        store.purge_expired(start + Duration::from_secs(59));
        assert_eq!(store.len(), 2);
        store.purge_expired(start + Duration::from_secs(60));
        assert_eq!(store.len(), 1);
        assert!(
            store
                .take_newest(start + Duration::from_secs(91), |_, _| true)
                .is_none()
        );
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let mut store = Bounded::new(0, Duration::from_secs(60));
        store.insert(Instant::now(), relay(), Ticket(1));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn takes_only_matching_servers() {
        let now = Instant::now();
        let mut store = Bounded::new(4, Duration::from_secs(60));
        store.insert(now, ServerName::try_from("other.test").unwrap(), Ticket(1));
        store.insert(now, relay(), Ticket(2));
        let taken = store.take_newest(now, |name, _| {
            name == &ServerName::try_from("other.test").unwrap()
        });
        assert_eq!(taken.unwrap().0, 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn real_tickets_are_bounded_and_resume_a_session() {
        let pki = pki();
        let server = server_config(&pki, false, 4);
        let store = TicketStore::new(2, Duration::from_secs(600));
        let mut client = client_config(&pki, None);
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);

        let first = handshake(Arc::clone(&client), Arc::clone(&server)).unwrap();
        assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(store.len(), 2, "4 tickets offered, 2 kept");

        let second = handshake(Arc::clone(&client), Arc::clone(&server)).unwrap();
        assert_eq!(
            second.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        assert!(store.len() <= 2);
        assert!(format!("{store:?}").contains("capacity: 2"));
    }

    #[test]
    fn without_capacity_there_is_no_resumption() {
        let pki = pki();
        let server = server_config(&pki, false, 4);
        let store = TicketStore::new(0, Duration::from_secs(600));
        let mut client = client_config(&pki, None);
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        handshake(Arc::clone(&client), Arc::clone(&server)).unwrap();
        assert!(store.is_empty());
        let again = handshake(client, server).unwrap();
        assert_eq!(again.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }

    #[test]
    fn after_a_clear_a_dial_of_the_old_generation_leaves_no_session_behind() {
        let pki = pki();
        let server = server_config(&pki, false, 2);
        let store = TicketStore::new(4, Duration::from_secs(600));
        let dial_config = |view: Arc<dyn ClientSessionStore>| {
            let mut client = client_config(&pki, None);
            client.resumption = rustls::client::Resumption::store(view);
            Arc::new(client)
        };
        // A dial begins, then the identity changes before its tickets arrive.
        let old = dial_config(store.for_dial());
        store.clear();
        handshake(Arc::clone(&old), Arc::clone(&server)).unwrap();
        assert!(
            store.is_empty(),
            "the old generation's tickets are not kept"
        );
        // A dial of the new generation stores and resumes as usual.
        let new = dial_config(store.for_dial());
        handshake(Arc::clone(&new), Arc::clone(&server)).unwrap();
        assert_eq!(store.len(), 2);
        let resumed = handshake(Arc::clone(&new), Arc::clone(&server)).unwrap();
        assert_eq!(
            resumed.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        // Sessions of the new generation are not offered to a dial of the old one.
        let stale = handshake(old, server).unwrap();
        assert_eq!(stale.handshake_kind(), Some(rustls::HandshakeKind::Full));
        store.clear();
        assert!(store.is_empty(), "a clear drops every session");
    }
}
