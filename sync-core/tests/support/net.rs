//! The network between the tabs and the hub: every request and reply is a packet that
//! arrives after a latency, and, driven by the world's seeded `fastrand::Rng`, may be
//! dropped, duplicated or delayed (which reorders it). It counts each of these, so that a
//! simulation can tell which faults it really exercised. A test can also hold packets that
//! match a predicate and release them later, to script one exact interleaving.
//!
//! An event stream is one connection: its packets arrive in the order sent (each may be
//! delayed, and overtake other traffic, but never its stream's earlier packets) or, when one
//! is lost, the stream breaks there. A duplicated event arrives twice in a row.

use sync_core::{Reply, Request, StreamInput, StreamRequest};

/// Which engine a packet belongs to: a tab, and which page load of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub tab: usize,
    pub generation: u32,
}

#[derive(Debug, Clone)]
pub enum Packet {
    Request {
        from: Page,
        request: Request,
    },
    /// The answer to `request`, which travels along so that tests can pick replies.
    Reply {
        to: Page,
        request: Request,
        reply: Reply,
    },
}

impl Packet {
    /// The request, or the request this replies to.
    pub fn request(&self) -> &Request {
        match self {
            Packet::Request { request, .. } | Packet::Reply { request, .. } => request,
        }
    }

    pub fn is_reply(&self) -> bool {
        matches!(self, Packet::Reply { .. })
    }

    pub fn page(&self) -> Page {
        match self {
            Packet::Request { from, .. } => *from,
            Packet::Reply { to, .. } => *to,
        }
    }
}

/// Traffic of an event stream.
#[derive(Debug, Clone)]
pub enum StreamPacket {
    /// A page opens its stream number `stream` (the shell's, for this page).
    Open { from: Page, stream: u64, request: StreamRequest },
    /// What the hub sends on stream `stream` of the page, or its end.
    Input { to: Page, stream: u64, input: StreamInput },
}

/// What can go wrong with a packet, each a probability per packet.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    /// Chance of an extra delay of up to `max_delay_ms` (packets overtake each other).
    pub delay: f64,
    pub max_delay_ms: u64,
}

type Hold = Box<dyn FnMut(&Packet) -> bool>;

pub struct Network {
    /// One-way latency of every packet.
    pub latency_ms: u64,
    pub faults: Faults,
    in_transit: Vec<(u64, u64, Packet)>,
    streams: Vec<(u64, u64, StreamPacket)>,
    held: Vec<Packet>,
    hold: Option<Hold>,
    seq: u64,
    /// The highest sequence number delivered so far: a packet below it was overtaken.
    delivered_seq: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Packets that arrived after a packet sent later than them.
    pub reordered: u64,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("latency_ms", &self.latency_ms)
            .field("faults", &self.faults)
            .field("in_transit", &self.in_transit.len())
            .field("held", &self.held.len())
            .finish()
    }
}

impl Network {
    pub fn new(latency_ms: u64) -> Network {
        Network {
            latency_ms,
            faults: Faults::default(),
            in_transit: Vec::new(),
            streams: Vec::new(),
            held: Vec::new(),
            hold: None,
            seq: 0,
            delivered_seq: 0,
            dropped: 0,
            duplicated: 0,
            reordered: 0,
        }
    }

    /// No more faults; packets already delayed still arrive late.
    pub fn heal(&mut self) {
        self.faults = Faults::default();
    }

    /// From now on, packets for which `hold` is true wait until [`Network::release`].
    pub fn hold_when(&mut self, hold: impl FnMut(&Packet) -> bool + 'static) {
        self.hold = Some(Box::new(hold));
    }

    /// Stops holding, and sends every held packet on its way (in the order held).
    pub fn release(&mut self, now: u64) -> usize {
        self.hold = None;
        let held = std::mem::take(&mut self.held);
        let count = held.len();
        for packet in held {
            self.schedule(now + self.latency_ms, packet);
        }
        count
    }

    /// Stops holding new packets; those held stay held.
    pub fn stop_holding(&mut self) {
        self.hold = None;
    }

    /// Sends the held packets for which `pick` is true on their way; the others stay held.
    pub fn release_if(&mut self, now: u64, mut pick: impl FnMut(&Packet) -> bool) -> usize {
        let (released, kept) = std::mem::take(&mut self.held).into_iter().partition::<Vec<_>, _>(|p| pick(p));
        self.held = kept;
        let count = released.len();
        for packet in released {
            self.schedule(now + self.latency_ms, packet);
        }
        count
    }

    /// Stops holding and drops every held packet (the browser aborted them, or they are lost).
    pub fn drop_held(&mut self) -> usize {
        self.hold = None;
        std::mem::take(&mut self.held).len()
    }

    pub fn held(&self) -> &[Packet] {
        &self.held
    }

    pub fn send(&mut self, now: u64, packet: Packet, rng: &mut fastrand::Rng) {
        if let Some(hold) = &mut self.hold
            && hold(&packet)
        {
            self.held.push(packet);
            return;
        }
        let faults = self.faults;
        if faults.drop > 0.0 && rng.f64() < faults.drop {
            self.dropped += 1;
            return;
        }
        let copies = if faults.duplicate > 0.0 && rng.f64() < faults.duplicate {
            self.duplicated += 1;
            2
        } else {
            1
        };
        let mut extra = || {
            if faults.delay > 0.0 && rng.f64() < faults.delay { rng.u64(0..=faults.max_delay_ms) } else { 0 }
        };
        if copies == 2 {
            let at = now + self.latency_ms + extra();
            self.schedule(at, packet.clone());
        }
        let at = now + self.latency_ms + extra();
        self.schedule(at, packet);
    }

    /// Sends a packet of an event stream, not arriving before `after` (its stream's last
    /// packet). Its arrival time, or `None` when it is lost (with `faulty`).
    pub fn send_stream(
        &mut self,
        now: u64,
        packet: StreamPacket,
        after: u64,
        faulty: bool,
        rng: &mut fastrand::Rng,
    ) -> Option<u64> {
        let faults = if faulty { self.faults } else { Faults::default() };
        if faults.drop > 0.0 && rng.f64() < faults.drop {
            self.dropped += 1;
            return None;
        }
        let extra =
            if faults.delay > 0.0 && rng.f64() < faults.delay { rng.u64(0..=faults.max_delay_ms) } else { 0 };
        let at = (now + self.latency_ms + extra).max(after);
        if let StreamPacket::Input { input: StreamInput::Event(_), .. } = &packet
            && faults.duplicate > 0.0
            && rng.f64() < faults.duplicate
        {
            self.duplicated += 1;
            self.seq += 1;
            self.streams.push((at, self.seq, packet.clone()));
        }
        self.seq += 1;
        self.streams.push((at, self.seq, packet));
        Some(at)
    }

    /// The stream packet due first at or before `now`, oldest sent first among equals.
    pub fn pop_stream_due(&mut self, now: u64) -> Option<StreamPacket> {
        let index = self
            .streams
            .iter()
            .enumerate()
            .filter(|(_, (at, _, _))| *at <= now)
            .min_by_key(|(_, (at, seq, _))| (*at, *seq))
            .map(|(i, _)| i)?;
        let (_, seq, packet) = self.streams.swap_remove(index);
        if seq < self.delivered_seq {
            self.reordered += 1;
        }
        self.delivered_seq = self.delivered_seq.max(seq);
        Some(packet)
    }

    fn schedule(&mut self, at: u64, packet: Packet) {
        self.seq += 1;
        self.in_transit.push((at, self.seq, packet));
    }

    pub fn is_idle(&self) -> bool {
        self.in_transit.is_empty() && self.streams.is_empty()
    }

    pub fn next_at(&self) -> Option<u64> {
        let streams = self.streams.iter().map(|(at, _, _)| *at);
        self.in_transit.iter().map(|(at, _, _)| *at).chain(streams).min()
    }

    /// The packet due first at or before `now`, oldest sent first among equals.
    pub fn pop_due(&mut self, now: u64) -> Option<Packet> {
        let index = self
            .in_transit
            .iter()
            .enumerate()
            .filter(|(_, (at, _, _))| *at <= now)
            .min_by_key(|(_, (at, seq, _))| (*at, *seq))
            .map(|(i, _)| i)?;
        let (_, seq, packet) = self.in_transit.swap_remove(index);
        if seq < self.delivered_seq {
            self.reordered += 1;
        }
        self.delivered_seq = self.delivered_seq.max(seq);
        Some(packet)
    }

    /// A page is going away: the browser aborts its requests still on the way, except the
    /// `keepalive` ones. Returns how many were aborted.
    pub fn abort_requests_of(&mut self, page: Page) -> usize {
        let before = self.in_transit.len();
        self.in_transit.retain(|(_, _, packet)| {
            !matches!(packet, Packet::Request { from, request } if *from == page && !request.keepalive)
        });
        before - self.in_transit.len()
    }
}
