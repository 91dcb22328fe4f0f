//! aya's `Pod` marker for the map types.
//!
//! SAFETY: `Pod` promises any bit pattern is a valid value and the type has no padding. Every type
//! below is `#[repr(C)]`, built only from integers and integer arrays, and its size is asserted in
//! `lib.rs` to equal the sum of its fields, so there is no padding and no invalid bit pattern.
use crate::{
    Config, ConnKey, NodeLimits, OrigDst, PodEntry, PodInbound, PodPort, ReadSlot, SendState,
    SockKey,
};

unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for PodEntry {}
unsafe impl aya::Pod for NodeLimits {}
unsafe impl aya::Pod for OrigDst {}
unsafe impl aya::Pod for ConnKey {}
unsafe impl aya::Pod for PodInbound {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for ReadSlot {}
unsafe impl aya::Pod for SendState {}
unsafe impl aya::Pod for PodPort {}
