//! The read slots the proxy shares with the kernel: one per accelerated socket, saying how much
//! the proxy has read from it (see the parent module for why the kernel needs to know).
use std::{
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering::Release},
    },
};

use aya::maps::MapData;
use mesh_abi::{READ_SLOT_COUNT, ReadSlot, SockKey};
use mesh_api::sync::LockExt;

use crate::sys::MappedArray;

/// The memory-mapped slot array and which of its slots are free.
pub(super) struct SlotPool {
    slots: MappedArray<Slot>,
    free: Mutex<Vec<u32>>,
    /// Keeps the slot array's map alive as long as it is mapped.
    _map: MapData,
}

impl SlotPool {
    pub(super) fn new(map: MapData) -> std::io::Result<Self> {
        // SAFETY: MESH_READ_SLOTS is an array map created BPF_F_MMAPABLE with READ_SLOT_COUNT
        // entries of `ReadSlot`, whose layout `Slot` matches (asserted below) with atomics only.
        let slots = unsafe { MappedArray::new(map.fd().as_fd(), READ_SLOT_COUNT as usize) }?;
        Ok(Self {
            slots,
            free: Mutex::new((0..READ_SLOT_COUNT).rev().collect()),
            _map: map,
        })
    }

    /// A free slot, reset and keyed to `key` with `limit`; `None` when every slot is taken.
    pub(super) fn take(pool: &Arc<Self>, key: &SockKey, limit: u32) -> Option<ReadCount> {
        let slot = pool.free.locked().pop()?;
        let reads = ReadCount {
            pool: pool.clone(),
            slot,
        };
        let s = reads.slot();
        s.read.store(0, Release);
        s.limit.store(limit, Release);
        s.set_key(key);
        Some(reads)
    }

    pub(super) fn free(&self) -> usize {
        self.free.locked().len()
    }
}

/// [`ReadSlot`] as this process shares it with the kernel: the same layout, in atomics.
#[repr(C)]
struct Slot {
    read: AtomicU64,
    limit: AtomicU32,
    _reserved: AtomicU32,
    key: [AtomicU32; 10],
    _pad: [AtomicU32; 2],
}

const _: () = assert!(std::mem::size_of::<Slot>() == std::mem::size_of::<ReadSlot>());
const _: () = assert!(std::mem::offset_of!(Slot, read) == std::mem::offset_of!(ReadSlot, read));
const _: () = assert!(std::mem::offset_of!(Slot, limit) == std::mem::offset_of!(ReadSlot, limit));
const _: () = assert!(std::mem::offset_of!(Slot, key) == std::mem::offset_of!(ReadSlot, key));
const _: () = assert!(std::mem::size_of::<SockKey>() == 40);

impl Slot {
    fn set_key(&self, key: &SockKey) {
        for (w, v) in self.key.iter().zip(key_words(key)) {
            w.store(v, Release);
        }
    }
}

/// A key as the ten 32-bit words the kernel compares (`SockKey` has no padding).
fn key_words(key: &SockKey) -> [u32; 10] {
    let mut bytes = [0u8; 40];
    bytes[..16].copy_from_slice(&key.local_addr);
    bytes[16..32].copy_from_slice(&key.remote_addr);
    bytes[32..34].copy_from_slice(&key.local_port.to_ne_bytes());
    bytes[34..36].copy_from_slice(&key.remote_port.to_ne_bytes());
    bytes[36..40].copy_from_slice(&key.family.to_ne_bytes());
    let mut words = [0u32; 10];
    for (w, c) in words.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    words
}

/// How much the proxy has read from one of its ends, published to the kernel. Dropping it frees
/// the slot.
pub struct ReadCount {
    pool: Arc<SlotPool>,
    slot: u32,
}

impl ReadCount {
    /// The slot's index, which the kernel finds through the readers map.
    pub(super) fn index(&self) -> u32 {
        self.slot
    }

    fn slot(&self) -> &Slot {
        self.pool
            .slots
            .get(self.slot as usize)
            .expect("slot index from the free list")
    }

    /// `n` more bytes were read.
    pub fn add(&self, n: usize) {
        if n > 0 {
            self.slot().read.fetch_add(n as u64, Release);
        }
    }
}

impl Drop for ReadCount {
    fn drop(&mut self) {
        // A cleared key makes the kernel ignore the slot (its map entry is left to the LRU).
        self.slot().set_key(&SockKey::default());
        self.pool.free.locked().push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_abi::AF_INET;

    #[test]
    fn key_words_are_the_key_in_memory_order() {
        // 10.0.0.5:15001 -> 10.1.0.2:40000, as `sock_key` builds it.
        let mut key = SockKey {
            local_port: 15001,
            remote_port: 40000,
            family: AF_INET as u32,
            ..SockKey::default()
        };
        key.local_addr[..4].copy_from_slice(&[10, 0, 0, 5]);
        key.remote_addr[..4].copy_from_slice(&[10, 1, 0, 2]);
        let w = key_words(&key);
        assert_eq!(w[0], u32::from_ne_bytes([10, 0, 0, 5]));
        assert_eq!(w[4], u32::from_ne_bytes([10, 1, 0, 2]));
        assert_eq!(w[8], u32::from(15001u16) | (u32::from(40000u16) << 16));
        assert_eq!(w[9], AF_INET as u32);
        assert_eq!(key_words(&SockKey::default()), [0; 10]);
    }
}
