//! Maps keyed by a `(namespace, name)` pair, looked up by borrowed `&str`s: the proxies look pods
//! up on every request, and building an owned key for each lookup would allocate twice.
//!
//! Keys implement [`Pair`] and `Borrow<dyn Pair>`; `dyn Pair` orders, compares and hashes exactly
//! as the owned key does (tuple and derived struct order/hash: field by field, `str` by `str`).
use std::{
    borrow::Borrow,
    cmp::Ordering,
    hash::{Hash, Hasher},
};

pub trait Pair {
    fn pair(&self) -> (&str, &str);
}

impl Pair for (String, String) {
    fn pair(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl Pair for (&str, &str) {
    fn pair(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn Pair + 'a> for (String, String) {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

impl PartialEq for dyn Pair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}

impl Eq for dyn Pair + '_ {}

impl PartialOrd for dyn Pair + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn Pair + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.pair().cmp(&other.pair())
    }
}

impl Hash for dyn Pair + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.pair().hash(h);
    }
}

/// The borrowed key for a lookup.
pub fn key<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    (a, b)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, hash_map::DefaultHasher};

    use super::*;

    #[test]
    fn borrowed_lookups_find_owned_keys() {
        let owned = ("ns".to_string(), "web".to_string());
        let mut h = DefaultHasher::new();
        owned.hash(&mut h);
        let mut h2 = DefaultHasher::new();
        (&key("ns", "web") as &dyn Pair).hash(&mut h2);
        assert_eq!(h.finish(), h2.finish());
        let b: BTreeMap<_, _> = [(owned.clone(), 1), (("a".into(), "z".into()), 2)].into();
        assert_eq!(b.get(&key("ns", "web") as &dyn Pair), Some(&1));
        assert_eq!(b.get(&key("ns", "we") as &dyn Pair), None);
        let m: HashMap<_, _> = [(owned, 1)].into();
        assert_eq!(m.get(&key("ns", "web") as &dyn Pair), Some(&1));
        assert_eq!(m.get(&key("nsw", "eb") as &dyn Pair), None);
    }
}
