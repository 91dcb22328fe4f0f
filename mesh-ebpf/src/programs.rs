//! The programs and their maps. Symbols are exported by name (`#[no_mangle]` via the aya macros),
//! so living in a module changes nothing for the loader.
use crate::ctx;
use crate::ctx::{v4_mapped, widen};
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash, lpm_trie::Key,
    },
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_abi::{
    AF_INET, AF_INET6, CONFIG_F_ACCEL, CONFIG_F_IPV4, CONFIG_F_IPV6, COUNTERS as N_COUNTERS,
    Config, ConnKey, NodeLimits, OrigDst, Outcome, POD_F_STRICT, PodEntry, PodInbound, PodPort,
    Program, READ_SLOT_COUNT, ReadSlot, SendState, SockKey, counter_index,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Sized for the busiest node we expect; LRU so a leak can never wedge new connections.
const CONN_ENTRIES: u32 = 65_536;

#[map(name = "MESH_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map(name = "MESH_ENROLLED")]
static ENROLLED: HashMap<u64, PodEntry> = HashMap::pinned(16_384, 0);
#[map(name = "MESH_ORIG_CK")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(CONN_ENTRIES, 0);
#[map(name = "MESH_ORIG_CONN")]
static ORIG_BY_CONN: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(CONN_ENTRIES, 0);
#[map(name = "MESH_EXCL_PORTS")]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(1_024, 0);
#[map(name = "MESH_EXCL_V4")]
static EXCLUDED_V4: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(1_024, 0);
#[map(name = "MESH_EXCL_V6")]
static EXCLUDED_V6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1_024, 0);
#[map(name = "MESH_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(N_COUNTERS, 0);
#[map(name = "MESH_DELIVERIES")]
static DELIVERIES: LruHashMap<SockKey, u8> = LruHashMap::pinned(CONN_ENTRIES, 0);
#[map(name = "MESH_EGRESS")]
static EGRESS_SOCKS: LruHashMap<u64, u8> = LruHashMap::pinned(CONN_ENTRIES, 0);
#[map(name = "MESH_PORT_MODES")]
static PORT_MODES: HashMap<PodPort, u32> = HashMap::pinned(16_384, 0);
#[map(name = "MESH_POD_IN")]
static POD_INBOUND: PerCpuHashMap<u32, PodInbound> = PerCpuHashMap::pinned(16_384, 0);
/// Not LRU: an entry must go exactly when its socket is released, or its pod's count would
/// drift. Allocated as used; the per-pod bound keeps it far from full (a full map fails the
/// connect, closed).
#[map(name = "MESH_REDIRECTED")]
static REDIRECTED: HashMap<u64, u32> = HashMap::pinned(4 * CONN_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "MESH_POD_HELD")]
static POD_HELD: HashMap<u32, u64> = HashMap::pinned(16_384, 0);
#[map(name = "MESH_LIMITS")]
static LIMITS: Array<NodeLimits> = Array::pinned(1, 0);
// Socket acceleration. These maps are not pinned: they belong to one proxy instance. A pod
// connection keeps the programs and maps of the instance it was established under; after that
// instance is gone its sends find no reader and go through TCP.

/// Pods' ends of their connections with the proxy; the sk_msg program runs on their sends.
/// Sockets leave the socket maps by themselves when they close; one that finds a map full stays
/// on plain TCP.
#[map(name = "MESH_SOCKS_TX")]
static SOCKS_TX: SockHash<SockKey> = SockHash::with_max_entries(CONN_ENTRIES, 0);
/// The proxy's ends: where bytes are handed over to. No program, so the proxy's own sends stay
/// plain TCP.
#[map(name = "MESH_SOCKS_RX")]
static SOCKS_RX: SockHash<SockKey> = SockHash::with_max_entries(CONN_ENTRIES, 0);
/// A proxy end's slot in READ_SLOTS. LRU: the proxy never deletes; a slot found under another
/// key is stale and ignored.
#[map(name = "MESH_READERS")]
static READERS: LruHashMap<SockKey, u32> = LruHashMap::with_max_entries(CONN_ENTRIES, 0);
/// How much the proxy has read from each of its ends, written through its memory mapping.
#[map(name = "MESH_READ_SLOTS")]
static READ_SLOTS: Array<ReadSlot> = Array::with_max_entries(READ_SLOT_COUNT, BPF_F_MMAPABLE);
/// Per pod end, what it has sent and how (set up by sock_ops).
#[map(name = "MESH_SENDERS")]
static SENDERS: LruHashMap<SockKey, SendState> = LruHashMap::with_max_entries(CONN_ENTRIES, 0);

#[inline(always)]
fn count(program: Program, outcome: Outcome) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(program, outcome)) {
        // SAFETY: per-CPU slot, and cgroup programs run with migration disabled: no other writer.
        unsafe { *c += 1 };
    }
}

/// Connect verdicts: 1 lets the (possibly rewritten) connect proceed, 0 fails it with EPERM.
#[inline(always)]
fn verdict(program: Program, outcome: Outcome) -> i32 {
    count(program, outcome);
    match outcome {
        Outcome::Denied | Outcome::PodFull => 0,
        _ => 1,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(sa: SockAddrContext) -> i32 {
    count(Program::Connect4, Outcome::Seen);
    let addr = ctx::user_ip4(&sa);
    let port = ctx::user_port(&sa);
    let outcome = redirect(&sa, Dest::V4(addr), port);
    if outcome == Outcome::Redirected {
        debug!(
            &sa,
            "connect4 redirected {:i}:{}",
            u32::from_be_bytes(addr),
            port
        );
    }
    verdict(Program::Connect4, outcome)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(sa: SockAddrContext) -> i32 {
    count(Program::Connect6, Outcome::Seen);
    let addr = ctx::user_ip6(&sa);
    let port = ctx::user_port(&sa);
    // A dual-stack socket reaching an IPv4 peer: the kernel connects it over IPv4, so treat it as
    // one (same exclusions, same proxy address), only written back in mapped form.
    let dest = match v4_mapped(&addr) {
        Some(v4) => Dest::Mapped(v4),
        None => Dest::V6(addr),
    };
    verdict(Program::Connect6, redirect(&sa, dest, port))
}

#[derive(Clone, Copy)]
enum Dest {
    V4([u8; 4]),
    /// An IPv4 destination given to an IPv6 socket as `::ffff:a.b.c.d`.
    Mapped([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn redirect(sa: &SockAddrContext, dest: Dest, port: u16) -> Outcome {
    if ctx::sock_type(sa) != SOCK_STREAM || ctx::protocol(sa) != IPPROTO_TCP {
        return Outcome::SkipNotTcp;
    }
    let netns = ctx::netns_cookie(sa);
    // SAFETY: the value is copied out at once; a concurrent delete can only make us read a stale
    // pod id, which the proxy then fails to resolve and refuses.
    let Some(pod) = (unsafe { ENROLLED.get(&netns) }).copied() else {
        return Outcome::SkipNotEnrolled;
    };
    let cookie = ctx::socket_cookie(sa);
    // The proxy's own socket in the pod's namespace, for traffic leaving the mesh as the pod.
    if EGRESS_SOCKS.get_ptr(cookie).is_some() {
        return Outcome::SkipEgress;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Outcome::Denied;
    };
    if EXCLUDED_PORTS.get_ptr(port).is_some() {
        return Outcome::SkipExcludedPort;
    }
    let (family, addr16) = match dest {
        Dest::V4(a) | Dest::Mapped(a) => {
            if a[0] == 127 || a == [0; 4] {
                return Outcome::SkipLoopback;
            }
            if cfg.flags & CONFIG_F_IPV4 == 0 {
                return Outcome::Denied;
            }
            if a == cfg.proxy_ip4 && port == cfg.proxy_port {
                return Outcome::SkipProxyAddr;
            }
            if EXCLUDED_V4.get(Key::new(32, a)).is_some() {
                return Outcome::SkipExcludedCidr;
            }
            (AF_INET, widen(a))
        }
        Dest::V6(a) => {
            if is_loopback6(&a) {
                return Outcome::SkipLoopback;
            }
            if cfg.flags & CONFIG_F_IPV6 == 0 {
                return Outcome::Denied;
            }
            if a == cfg.proxy_ip6 && port == cfg.proxy_port {
                return Outcome::SkipProxyAddr;
            }
            if EXCLUDED_V6.get(Key::new(128, a)).is_some() {
                return Outcome::SkipExcludedCidr;
            }
            (AF_INET6, a)
        }
    };
    if let Err(refused) = hold(cookie, pod.pod_id) {
        return refused;
    }
    let record = OrigDst {
        addr: addr16,
        port,
        family,
        pod_id: pod.pod_id,
        netns_cookie: netns,
    };
    if ORIG_BY_COOKIE.insert(cookie, record, 0).is_err() {
        return Outcome::Denied;
    }
    match dest {
        Dest::V4(_) => ctx::set_user_ip4(sa, cfg.proxy_ip4),
        Dest::Mapped(_) => ctx::set_user_ip6(sa, mapped(cfg.proxy_ip4)),
        Dest::V6(_) => ctx::set_user_ip6(sa, cfg.proxy_ip6),
    }
    ctx::set_user_port(sa, cfg.proxy_port);
    Outcome::Redirected
}

/// Counts a socket against its pod's share of the node's record maps, once per socket (a socket
/// may connect again after a failed attempt). The entry goes when the pod releases the socket
/// ([`mesh_sock_release`]); until then the socket may hold one record in each map. Refused when
/// the pod holds its limit already: it cannot crowd other pods' records out of the maps.
#[inline(always)]
fn hold(cookie: u64, pod: u32) -> Result<(), Outcome> {
    if REDIRECTED.get_ptr(cookie).is_some() {
        return Ok(());
    }
    let held = match POD_HELD.get_ptr_mut(pod) {
        Some(h) => h,
        None => {
            // The pod's first socket; on a race the other CPU's insert wins and is used.
            let _ = POD_HELD.insert(pod, 0, BPF_NOEXIST as u64);
            POD_HELD.get_ptr_mut(pod).ok_or(Outcome::Denied)?
        }
    };
    let limit = LIMITS.get(0).map_or(0, |l| l.redirected_per_pod);
    // Read, then add: sockets connecting at the same instant on other CPUs can overshoot the
    // limit by one each, which bounds the same.
    if limit != 0 && ctx::load(held) >= u64::from(limit) {
        return Err(Outcome::PodFull);
    }
    if REDIRECTED.insert(cookie, pod, BPF_NOEXIST as u64).is_err() {
        return Err(Outcome::Denied);
    }
    ctx::add(held, 1);
    Ok(())
}

/// A pod's socket is released. It no longer counts against its pod. A socket that never sent a
/// SYN (its connect failed first, e.g. with no local port free) never gets the state change
/// that removes its record, so the record goes here; a connected one's goes when TCP closes it,
/// maybe later (bytes the pod wrote before closing are still on their way to the proxy).
#[cgroup_sock(sock_release)]
pub fn mesh_sock_release(sk: SockContext) -> i32 {
    let cookie = ctx::sk_socket_cookie(&sk);
    // SAFETY: copied out at once; only this socket's own hooks write its entry.
    let Some(pod) = (unsafe { REDIRECTED.get(cookie) }).copied() else {
        return 1;
    };
    if REDIRECTED.remove(cookie).is_err() {
        return 1;
    }
    // Never below zero: a count the node proxy swept (pod gone) and a new one made since must
    // not be counted down by the old sockets.
    if let Some(held) = POD_HELD.get_ptr_mut(pod)
        && ctx::load(held) != 0
    {
        ctx::sub(held, 1);
    }
    if ctx::sk_state(&sk) == BPF_TCP_CLOSE {
        let _ = ORIG_BY_COOKIE.remove(cookie);
    }
    count(Program::SockRelease, Outcome::Closed);
    1
}

#[sock_ops]
pub fn mesh_sock_ops(ops: SockOpsContext) -> u32 {
    match ops.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ops),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ops),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => accepted(&ops),
        BPF_SOCK_OPS_STATE_CB if ops.arg(1) == BPF_TCP_CLOSE => closed(&ops),
        _ => {}
    }
    1
}

/// Adds a pod's end of a connection with the node proxy to the sending socket map (the proxy
/// adds its own end to the receiving one), with its send state. Nothing was sent through the map
/// yet: this runs as the handshake completes.
#[inline(always)]
fn accelerate(ops: &SockOpsContext, cfg: &Config) {
    if cfg.flags & CONFIG_F_ACCEL == 0 {
        return;
    }
    // More than the SYN acknowledged: data went with it (TCP Fast Open, which the proxy never
    // accepts) and the stream would not start at snd_una. Leave such a socket on TCP.
    if crate::ctx::ops_bytes_acked(ops) > 1 {
        count(Program::SockOps, Outcome::AccelFailed);
        return;
    }
    // A socket in a socket map numbers zerocopy completions per internal chunk, not per send
    // of the app's: an app using MSG_ZEROCOPY must stay off it altogether. (A client sets
    // SO_ZEROCOPY before connecting; an accepted socket has its listener's.)
    match crate::ctx::ops_sender(ops) {
        Some(s) if !s.zerocopy => {}
        Some(_) => {
            count(Program::SockOps, Outcome::ZeroCopy);
            return;
        }
        None => {
            count(Program::SockOps, Outcome::AccelFailed);
            return;
        }
    }
    let mut key = crate::ctx::ops_sock_key(ops);
    let state = SendState {
        total: 0,
        tcp_end: 0,
        // The stream starts right after the acknowledged SYN; anything queued beyond it went
        // through TCP, and the first send counts it.
        last_seq: crate::ctx::ops_snd_una(ops),
        _reserved: 0,
    };
    if SENDERS.insert(&key, &state, 0).is_err() {
        count(Program::SockOps, Outcome::AccelFailed);
        return;
    }
    // SAFETY of the cast: the helper only reads the context through it.
    let ops_ptr = unsafe { &mut *ops.ops };
    match SOCKS_TX.update(&mut key, ops_ptr, BPF_ANY as u64) {
        Ok(()) => {
            // Ask for state changes so the send state goes when the socket closes.
            let _ = ops.set_cb_flags((ops.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            count(Program::SockOps, Outcome::Accelerated)
        }
        Err(_) => count(Program::SockOps, Outcome::AccelFailed),
    }
}

/// A pod accepted a connection. From the node proxy's address it is mesh traffic the proxy
/// delivers: the pod's end joins the socket map.
#[inline(always)]
fn accepted(ops: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    let from_proxy = if crate::ctx::ops_family(ops) == AF_INET as u32 {
        cfg.flags & CONFIG_F_IPV4 != 0 && crate::ctx::ops_remote_ip4(ops) == cfg.proxy_ip4
    } else {
        let remote = crate::ctx::ops_remote_ip6(ops);
        match v4_mapped(&remote) {
            Some(v4) => cfg.flags & CONFIG_F_IPV4 != 0 && v4 == cfg.proxy_ip4,
            None => cfg.flags & CONFIG_F_IPV6 != 0 && remote == cfg.proxy_ip6,
        }
    };
    if from_proxy {
        accelerate(ops, cfg);
    }
}

/// Every send of a pod on a connection with the node proxy. When it is safe, the bytes go
/// straight into the proxy's socket, skipping TCP/IP and the veth between pod and node. They go
/// through TCP instead when
/// - the proxy has not read everything this socket sent through TCP (the first bytes of a
///   connection, sent before the proxy accepted it, or bytes of an earlier fallback): handing
///   over now would let these bytes overtake those, because a reader takes handed-over bytes
///   before TCP's;
/// - the proxy has as much unread from this socket as it allows: TCP's flow control then makes
///   the pod wait for the proxy, as it would without us (handed-over bytes have no limit of
///   their own: a pod could otherwise fill the kernel's memory);
/// - the socket has `SO_ZEROCOPY` on: the app waits for a completion notification for each
///   zerocopy send, and handed-over bytes never get one.
///
/// Positions are bytes of the pod's stream: what the pod sent (TCP bytes measured by the growth
/// of its `write_seq`, handed-over ones counted here) against what the proxy has read (from its
/// memory-mapped slot). Stale figures can only send bytes through TCP.
///
/// Bytes are only ever handed to the proxy, never to pods: on this kernel generation a reader
/// using `splice()` does not see handed-over bytes at all, and a pod may read any way it likes.
#[sk_msg]
pub fn mesh_sk_msg(msg: SkMsgContext) -> u32 {
    let outcome = judge(&msg);
    count(Program::SkMsg, outcome);
    SK_PASS
}

#[inline(always)]
fn judge(msg: &SkMsgContext) -> Outcome {
    let own = crate::ctx::msg_sock_key(msg);
    let Some(st) = crate::ctx::send_state(&SENDERS, &own) else {
        return Outcome::NoPeer;
    };
    let Some(me) = crate::ctx::msg_sender(msg) else {
        return Outcome::NoPeer;
    };
    // The socket is locked while this runs, so write_seq is stable; what it grew by since the
    // last send judged went through TCP.
    let tcp = me.write_seq.wrapping_sub(st.last_seq);
    st.last_seq = me.write_seq;
    if tcp != 0 {
        st.total += tcp as u64;
        st.tcp_end = st.total;
    }
    // SO_ZEROCOPY turned on after the socket joined: the app waits for a completion for every
    // zerocopy send before it reuses the buffer, and only TCP sends them (numbered per chunk
    // here, not per send: see the README).
    if me.zerocopy {
        return Outcome::ZeroCopy;
    }
    let peer = own.peer();
    let Some(slot) = (unsafe { READERS.get(&peer) }).copied() else {
        return Outcome::NoPeer;
    };
    let Some((read, limit, key)) = crate::ctx::read_slot(&READ_SLOTS, slot) else {
        return Outcome::NoPeer;
    };
    if key != peer {
        return Outcome::NoPeer;
    }
    if read < st.tcp_end {
        return Outcome::Unread;
    }
    let size = crate::ctx::msg_size(msg) as u64;
    // The proxy cannot have read more than was sent; if the figures say so, trust neither.
    match (st.total + size).checked_sub(read) {
        Some(unread) if unread <= limit as u64 => {}
        _ => return Outcome::PeerFull,
    }
    if crate::ctx::hand_over(msg, &SOCKS_RX, peer) {
        st.total += size;
        Outcome::Accelerated
    } else {
        Outcome::NoPeer
    }
}

/// A redirected socket sends its SYN: ask for its state changes from now on, so its record goes
/// when it closes even if it never connects (refused while the proxy restarts, or closed by the
/// pod in the middle of the handshake). Otherwise a pod could fill the node's shared record map
/// with the records of connections that never were, and push out other pods' records.
#[inline(always)]
fn connecting(ops: &SockOpsContext) {
    let cookie = ctx::ops_socket_cookie(ops);
    if ORIG_BY_COOKIE.get_ptr(&cookie).is_some() {
        let _ = ops.set_cb_flags((ops.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// The client's port is known now: index the record by the address the proxy will see as peer.
/// This runs before the final ACK is sent, so before the proxy can accept the connection.
#[inline(always)]
fn established(ops: &SockOpsContext) {
    count(Program::SockOps, Outcome::Seen);
    let cookie = ctx::ops_socket_cookie(ops);
    // SAFETY: copied out at once; entries of one socket are only written by that socket's hooks.
    let Some(record) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        count(Program::SockOps, Outcome::NoRecord);
        return;
    };
    let key = client_key(ops);
    if ORIG_BY_CONN.insert(key, record, 0).is_err() {
        count(Program::SockOps, Outcome::Denied);
        return;
    }
    // Ask for state changes so both records go when the client socket closes.
    let _ = ops.set_cb_flags((ops.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(Program::SockOps, Outcome::Redirected);
    if let Some(cfg) = CONFIG.get(0) {
        accelerate(ops, cfg);
    }
}

#[inline(always)]
fn closed(ops: &SockOpsContext) {
    let _ = SENDERS.remove(&crate::ctx::ops_sock_key(ops));
    let cookie = ctx::ops_socket_cookie(ops);
    if ORIG_BY_COOKIE.remove(cookie).is_err() {
        // A pod's accepted socket (asked for state changes only for its send state).
        return;
    }
    // Called before the kernel releases the port, so the key is still the one we stored.
    let _ = ORIG_BY_CONN.remove(client_key(ops));
    count(Program::SockOps, Outcome::Closed);
}

#[inline(always)]
fn client_key(ops: &SockOpsContext) -> ConnKey {
    let port = ops.local_port() as u16;
    if ops.family() == AF_INET as u32 {
        return ConnKey::v4(ctx::ops_local_ip4(ops), port);
    }
    let ip6 = ctx::ops_local_ip6(ops);
    match v4_mapped(&ip6) {
        Some(v4) => ConnKey::v4(v4, port),
        None => ConnKey::v6(ip6, port),
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_peername4(sa: SockAddrContext) -> i32 {
    count(Program::GetPeerName, Outcome::Seen);
    // SAFETY: copied out at once.
    match unsafe { ORIG_BY_COOKIE.get(ctx::socket_cookie(&sa)) }.copied() {
        Some(r) if r.family == AF_INET => {
            ctx::set_user_ip4(&sa, [r.addr[0], r.addr[1], r.addr[2], r.addr[3]]);
            ctx::set_user_port(&sa, r.port);
            count(Program::GetPeerName, Outcome::Redirected);
        }
        _ => count(Program::GetPeerName, Outcome::NoRecord),
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_peername6(sa: SockAddrContext) -> i32 {
    count(Program::GetPeerName, Outcome::Seen);
    // SAFETY: copied out at once.
    match unsafe { ORIG_BY_COOKIE.get(ctx::socket_cookie(&sa)) }.copied() {
        Some(r) => {
            let addr = if r.family == AF_INET6 {
                r.addr
            } else {
                mapped([r.addr[0], r.addr[1], r.addr[2], r.addr[3]])
            };
            ctx::set_user_ip6(&sa, addr);
            ctx::set_user_port(&sa, r.port);
            count(Program::GetPeerName, Outcome::Redirected);
        }
        None => count(Program::GetPeerName, Outcome::NoRecord),
    }
    1
}

/// New inbound connections to enrolled pods. Mesh traffic reaches a pod only from its node proxy,
/// which records each connection it opens to a pod in `DELIVERIES` before connecting; any other
/// SYN is plaintext from outside the mesh (even one from the proxy's address, which any host
/// process can bind): dropped for STRICT pods, counted for PERMISSIVE ones. A port of the pod may
/// have its own mode (`PORT_MODES`). Only SYNs are judged, so established connections cost a
/// header read per packet. Loopback inside the pod is always allowed.
///
/// The pod is the receiving socket's network namespace. Where cgroup_skb programs may call
/// `bpf_get_netns_cookie` the helper gives it; elsewhere (6.1, 6.12, ...) the loader picks
/// `mesh_ingress_btf` instead, which reads the same cookie from the socket. The loader probes
/// which one this kernel takes; both judge with `ingress`.
#[cgroup_skb(ingress)]
pub fn mesh_ingress(skb: SkBuffContext) -> i32 {
    ingress(&skb, |skb| Some(ctx::skb_netns_cookie(skb)))
}

/// `mesh_ingress` for kernels whose cgroup_skb programs lack `bpf_get_netns_cookie`: the cookie
/// is read from the receiving socket (`sk->__sk_common.skc_net->net_cookie`, offsets from the
/// kernel's BTF), which is what the helper returns.
#[cgroup_skb(ingress)]
pub fn mesh_ingress_btf(skb: SkBuffContext) -> i32 {
    ingress(&skb, ctx::skb_sock_netns_cookie)
}

#[inline(always)]
fn ingress(skb: &SkBuffContext, netns: impl Fn(&SkBuffContext) -> Option<u64>) -> i32 {
    let syn = match ctx::inbound(skb) {
        ctx::Inbound::Syn(s) => Some(s),
        ctx::Inbound::Other => return 1,
        ctx::Inbound::Unparsed => None,
    };
    let Some(netns) = netns(skb) else {
        // The BTF form finds no TCP socket: an unparsed packet then is not TCP, not ours to
        // judge. A TCP SYN always reaches a full listening socket, so for one this only fails if
        // the kernel changed under us: fail closed, counted.
        if syn.is_none() {
            return 1;
        }
        count(Program::Ingress, Outcome::Seen);
        count(Program::Ingress, Outcome::NoRecord);
        return 0;
    };
    // SAFETY: copied out at once.
    let Some(pod) = (unsafe { ENROLLED.get(&netns) }).copied() else {
        return 1;
    };
    let outcome = if ctx::skb_ifindex(skb) == LOOPBACK_IFINDEX {
        Outcome::SkipLoopback
    } else {
        match &syn {
            // Whatever it is, a STRICT pod does not take what cannot be judged.
            None if pod.flags & POD_F_STRICT != 0 => Outcome::Unparsed,
            None => return 1,
            Some(s) if DELIVERIES.get_ptr(s).is_some() => Outcome::FromProxy,
            Some(s) => {
                if from_proxy_addr(s) {
                    count(Program::Ingress, Outcome::Undelivered);
                }
                if strict_on(&pod, s.remote_port) {
                    Outcome::Denied
                } else {
                    Outcome::Plaintext
                }
            }
        }
    };
    count(Program::Ingress, Outcome::Seen);
    count(Program::Ingress, outcome);
    let dropped = matches!(outcome, Outcome::Denied | Outcome::Unparsed);
    if dropped || outcome == Outcome::Plaintext {
        count_pod(pod.pod_id, dropped);
    }
    if dropped { 0 } else { 1 }
}

/// `lo` has index 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether a SYN comes from the proxy's address (only counted: the address proves nothing).
#[inline(always)]
fn from_proxy_addr(syn: &SockKey) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    if syn.family == AF_INET as u32 {
        cfg.flags & CONFIG_F_IPV4 != 0 && syn.local_addr == widen(cfg.proxy_ip4)
    } else {
        cfg.flags & CONFIG_F_IPV6 != 0 && syn.local_addr == cfg.proxy_ip6
    }
}

/// The pod's mode on one of its ports: the port's own where one is set, else the pod's.
#[inline(always)]
fn strict_on(pod: &PodEntry, port: u16) -> bool {
    let key = PodPort {
        pod_id: pod.pod_id,
        port,
        _reserved: 0,
    };
    // SAFETY: copied out at once.
    let flags = unsafe { PORT_MODES.get(&key) }
        .copied()
        .unwrap_or(pod.flags);
    flags & POD_F_STRICT != 0
}

#[inline(always)]
fn count_pod(pod_id: u32, denied: bool) {
    if POD_INBOUND.get_ptr_mut(pod_id).is_none() {
        let _ = POD_INBOUND.insert(pod_id, PodInbound::default(), 0);
    }
    if let Some(c) = POD_INBOUND.get_ptr_mut(pod_id) {
        // SAFETY: per-CPU value of this CPU; cgroup programs run with migration disabled.
        unsafe {
            if denied {
                (*c).denied += 1;
            } else {
                (*c).plaintext += 1;
            }
        }
    }
}

#[inline(always)]
fn mapped(a: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12] = a[0];
    m[13] = a[1];
    m[14] = a[2];
    m[15] = a[3];
    m
}

#[inline(always)]
fn is_loopback6(a: &[u8; 16]) -> bool {
    let mut high = 0u8;
    let mut i = 0;
    while i < 15 {
        high |= a[i];
        i += 1;
    }
    high == 0 && (a[15] == 1 || a[15] == 0)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
