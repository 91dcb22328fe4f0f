//! The module import graph of a crate, and the check that it has no cycle.
//!
//! Data flows one way through the node proxy (kernel → proxy → policy → http → telemetry), and a
//! cycle between modules is where that shape starts to erode: two modules that import each other
//! can only be read, tested and changed together. This reads the sources, not the compiler's view,
//! which is enough for imports: every edge is a path that starts with `crate::`, `super::` or
//! `self::`, or a `use` of a child module by its bare name. A module's own `mod` declarations are
//! not edges.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context, bail};

/// A module path inside the crate (`["proxy", "tunnel"]`); the crate root is empty.
type Module = Vec<String>;

/// Module → the modules it imports.
pub(crate) type Graph = BTreeMap<Module, BTreeSet<Module>>;

/// Fails naming every cycle between the modules of the crate whose sources are in `src`.
pub(crate) fn check(src: &Path) -> anyhow::Result<()> {
    let graph = read(src)?;
    let cycles = cycles(&graph);
    if cycles.is_empty() {
        eprintln!(
            "{}: {} modules, no import cycle",
            src.display(),
            graph.len()
        );
        return Ok(());
    }
    let mut text = String::new();
    for c in &cycles {
        text.push_str("\n  ");
        text.push_str(&show_cycle(&graph, c));
    }
    bail!(
        "{}: modules that import each other (move the shared item to the lower layer):{text}",
        src.display()
    )
}

/// A crate's layers: each entry names a module (with its submodules, unless they have an entry
/// of their own; `X::*` names X's submodules only) and its layer, lowest first.
pub(crate) type Layers = &'static [(&'static str, u8)];

/// mesh-node's layers (`mesh-node/src/lib.rs` explains them). A module imports only from its own
/// layer or lower ones.
pub(crate) const MESH_NODE_LAYERS: Layers = &[
    // Base: system calls, readiness, flags, certificates, the kernel side.
    ("sys", 0),
    ("ready", 0),
    ("config", 0),
    ("identity", 0),
    ("kernel", 0),
    // The compiled parts a configuration version holds: pure, importing only the base.
    ("policy::authz", 1),
    ("policy::routes", 1),
    ("http", 1),
    ("http::*", 4),
    ("http::services", 1),
    ("http::balance", 1),
    ("http::policy", 1),
    // One configuration version, and the stream it comes from.
    ("config::node", 2),
    ("config::subscribe", 2),
    ("pods", 3),
    ("telemetry", 3),
    // The data path.
    ("policy", 4),
    ("proxy", 4),
    // Wiring.
    ("admin", 5),
    ("mode", 5),
    ("app", 5),
    ("fuzz", 6),
];

/// A module's layer: its own entry, else that of the nearest enclosing module (`X::*` covers
/// only X's submodules, `X` covers X and them).
fn layer_of(layers: Layers, m: &[String]) -> Option<u8> {
    let find = |name: &str| layers.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
    find(&m.join("::")).or_else(|| {
        (1..m.len()).rev().find_map(|n| {
            let p = m[..n].join("::");
            find(&format!("{p}::*")).or_else(|| find(&p))
        })
    })
}

/// Fails naming every import from a lower layer into a higher one, and every module the table
/// does not place.
pub(crate) fn check_layers(src: &Path, layers: Layers) -> anyhow::Result<()> {
    let graph = read(src)?;
    let mut wrong = Vec::new();
    for (m, deps) in &graph {
        if m.is_empty() {
            continue;
        }
        let Some(lm) = layer_of(layers, m) else {
            wrong.push(format!(
                "{} has no layer (add it to the table in xtask)",
                name(m)
            ));
            continue;
        };
        for d in deps.iter().filter(|d| !d.is_empty()) {
            if let Some(ld) = layer_of(layers, d)
                && ld > lm
            {
                wrong.push(format!(
                    "{} (layer {lm}) imports {} (layer {ld})",
                    name(m),
                    name(d)
                ));
            }
        }
    }
    if wrong.is_empty() {
        eprintln!(
            "{}: every import goes to the same or a lower layer",
            src.display()
        );
        return Ok(());
    }
    bail!(
        "{}: imports against the layers (move the item down, or pass it in from above):\n  {}",
        src.display(),
        wrong.join("\n  ")
    )
}

/// Prints each module with what it imports (`cargo xtask modules`).
pub(crate) fn print(src: &Path) -> anyhow::Result<()> {
    for (m, deps) in read(src)? {
        let deps: Vec<String> = deps.iter().map(|d| name(d)).collect();
        println!("{}: {}", name(&m), deps.join(" "));
    }
    Ok(())
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Reads every module file under `src` (the library's; `main.rs` and `bin/` are other crates).
pub(crate) fn read(src: &Path) -> anyhow::Result<Graph> {
    let mut files = BTreeMap::new();
    collect(src, src, &mut files)?;
    Ok(graph(&files))
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<Module, String>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
        if path.is_dir() {
            if rel != "bin" {
                collect(root, &path, out)?;
            }
            continue;
        }
        let Some(stem) = rel.strip_suffix(".rs") else {
            continue;
        };
        if stem == "main" {
            continue;
        }
        let mut module: Module = stem.split('/').map(String::from).collect();
        if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
            module.pop();
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        out.insert(module, text);
    }
    Ok(())
}

/// The import graph of `files` (module → its source text).
pub(crate) fn graph(files: &BTreeMap<Module, String>) -> Graph {
    let known: BTreeSet<&Module> = files.keys().collect();
    let mut graph = Graph::new();
    for (module, text) in files {
        let children: BTreeSet<&str> = files
            .keys()
            .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
            .filter_map(|k| k.last().map(String::as_str))
            .collect();
        let deps = graph.entry(module.clone()).or_default();
        for (within, path) in paths(&strip_comments(text), &children) {
            let here: Module = module.iter().chain(&within).cloned().collect();
            let Some(abs) = absolute(&here, &path) else {
                continue;
            };
            // The longest prefix that is a module: `crate::proxy::tunnel::Accepted` → proxy::tunnel.
            let target = (1..=abs.len())
                .rev()
                .map(|n| abs[..n].to_vec())
                .find(|p| known.contains(p));
            if let Some(t) = target
                && t != *module
            {
                deps.insert(t);
            }
        }
    }
    graph
}

/// Removes `//` comments (outside string literals) so that doc text naming a module is no edge.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut cut = line.len();
        for (i, c) in line.char_indices() {
            match c {
                '"' if prev != '\\' => in_str = !in_str,
                '/' if !in_str && prev == '/' => {
                    cut = i - 1;
                    break;
                }
                _ => {}
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// Every path the text names that could lead into the crate, with the inline module (`mod tests
/// { .. }`) it appears in: segments from `crate`, `super`, or `self`, or (in a `use`) from a child
/// module's bare name. Use-trees (`a::{b, c::d}`) are expanded; string and char literals skipped.
fn paths(text: &str, children: &BTreeSet<&str>) -> Vec<(Module, Vec<String>)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0usize;
    // Inline modules open here: (name, the brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut pending_mod: Option<String> = None;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i = string_end(bytes, i);
                continue;
            }
            b'\'' => {
                // A char literal ('x', '\n', '{'); a lifetime has no closing quote.
                let close = if bytes.get(i + 1) == Some(&b'\\') {
                    i + 3
                } else {
                    i + 2
                };
                i = if bytes.get(close) == Some(&b'\'') {
                    close + 1
                } else {
                    i + 1
                };
                continue;
            }
            b'{' => {
                depth += 1;
                if let Some(name) = pending_mod.take() {
                    inline.push((name, depth));
                }
                i += 1;
                continue;
            }
            b'}' => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
                continue;
            }
            b';' => {
                pending_mod = None;
                i += 1;
                continue;
            }
            _ => {}
        }
        let at_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let after_path = i >= 2 && &bytes[i - 2..i] == b"::";
        if !at_word || after_path || !(bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
            i += 1;
            continue;
        }
        let end = word_end(bytes, i);
        let word = &text[i..end];
        if word == "mod" {
            let name_at = end + text[end..].len() - text[end..].trim_start().len();
            let name_end = word_end(bytes, name_at);
            pending_mod = Some(text[name_at..name_end].to_string());
            i = name_end;
            continue;
        }
        let starts_path = matches!(word, "crate" | "super" | "self")
            || (inline.is_empty() && children.contains(word) && in_use(text, i));
        if starts_path && text[end..].starts_with("::") {
            let (trees, next) = tree(text, i);
            let within: Module = inline.iter().map(|(n, _)| n.clone()).collect();
            out.extend(trees.into_iter().map(|t| (within.clone(), t)));
            i = next;
        } else {
            i = end;
        }
    }
    out
}

/// Where the string literal opening at `from` ends (after its closing quote).
fn string_end(bytes: &[u8], from: usize) -> usize {
    let mut i = from + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn word_end(bytes: &[u8], from: usize) -> usize {
    let mut e = from;
    while e < bytes.len() && (bytes[e].is_ascii_alphanumeric() || bytes[e] == b'_') {
        e += 1;
    }
    e
}

/// Whether position `at` is inside a `use` item: the word `use` since the last `;`.
fn in_use(text: &str, at: usize) -> bool {
    let before = &text[..at];
    let start = before.rfind(';').map_or(0, |p| p + 1);
    before[start..]
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w == "use")
}

/// Parses the use-tree starting at `from`: its expanded paths, and where it ends.
fn tree(text: &str, from: usize) -> (Vec<Vec<String>>, usize) {
    let bytes = text.as_bytes();
    let mut prefix = Vec::new();
    let mut i = from;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            let mut out = Vec::new();
            i += 1;
            loop {
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    return (out, i + 1);
                }
                let (subs, next) = tree(text, i);
                for s in subs {
                    let mut p = prefix.clone();
                    p.extend(s);
                    out.push(p);
                }
                if next <= i {
                    return (out, i + 1);
                }
                i = next;
            }
        }
        let end = word_end(bytes, i);
        if end == i {
            // `*` or the end of the path.
            return (vec![prefix], i + 1);
        }
        prefix.push(text[i..end].to_string());
        i = end;
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// `path` as seen from `module`, made absolute; `None` when it leaves the crate.
fn absolute(module: &[String], path: &[String]) -> Option<Module> {
    let mut segs = path.iter().peekable();
    let mut base: Module = match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
            Vec::new()
        }
        _ => module.to_vec(),
    };
    while let Some(s) = segs.peek() {
        match s.as_str() {
            "super" => {
                base.pop()?;
            }
            "self" => {}
            _ => break,
        }
        segs.next();
    }
    base.extend(segs.cloned());
    Some(base)
}

/// Every set of modules that import each other (Tarjan's strongly connected components).
pub(crate) fn cycles(graph: &Graph) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            if !s.graph.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.stack.contains(&w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// One loop through `component`, e.g. `a -> b -> a`, so the message shows the imports to cut.
fn show_cycle(graph: &Graph, component: &[Module]) -> String {
    let inside: BTreeSet<&Module> = component.iter().collect();
    let start = &component[0];
    // Breadth-first from start back to start, inside the component.
    let mut came_from: BTreeMap<&Module, &Module> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flatten() {
            if !inside.contains(w) || came_from.contains_key(w) {
                continue;
            }
            came_from.insert(w, v);
            if w == start {
                let mut path = vec![name(start)];
                let mut at = came_from[start];
                while at != start {
                    path.push(name(at));
                    at = came_from[at];
                }
                path.push(name(start));
                path.reverse();
                return path.join(" -> ");
            }
            queue.push_back(w);
        }
    }
    component
        .iter()
        .map(|m| name(m))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<Module, String> {
        list.iter()
            .map(|(m, t)| {
                let m: Module = if m.is_empty() {
                    Vec::new()
                } else {
                    m.split("::").map(String::from).collect()
                };
                (m, t.to_string())
            })
            .collect()
    }

    fn deps(g: &Graph, m: &str) -> Vec<String> {
        let key: Module = m.split("::").map(String::from).collect();
        g[&key].iter().map(|d| name(d)).collect()
    }

    #[test]
    fn paths_of_every_form_are_edges() {
        let g = graph(&files(&[
            ("", "pub mod a; pub mod b; pub mod c; pub mod p;"),
            (
                "a",
                "use crate::{b::X, c::{self, Y}};\nfn f() { crate::p::q::g(); }",
            ),
            (
                "b",
                "// crate::a::Z is only named in a comment\nlet s = \"crate::a\";",
            ),
            ("c", ""),
            ("p", "mod q;\npub(crate) use q::Thing;"),
            ("p::q", "use super::super::c;\nuse self::inner::X;"),
        ]));
        assert_eq!(deps(&g, "a"), ["b", "c", "p::q"]);
        assert_eq!(deps(&g, "p"), ["p::q"]);
        assert_eq!(deps(&g, "p::q"), ["c"]);
        // A comment is no edge; a string literal is no path either (it is not followed by `::`).
        assert!(deps(&g, "b").is_empty());
        assert!(cycles(&g).is_empty());
    }

    #[test]
    fn a_cycle_is_named_with_the_loop_to_cut() {
        let g = graph(&files(&[
            ("", ""),
            ("tunnel", "use crate::http::Carried;"),
            ("http", "use crate::http::inner::X;\nmod inner;"),
            ("http::inner", "use crate::proxy::ProxySource;"),
            ("proxy", "use crate::tunnel::Stream;"),
            ("leaf", "use crate::tunnel::Stream;"),
        ]));
        let c = cycles(&g);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].len(), 4);
        assert_eq!(
            show_cycle(&g, &c[0]),
            "http -> http::inner -> proxy -> tunnel -> http"
        );
    }

    #[test]
    fn an_import_into_a_higher_layer_is_named() {
        const LAYERS: Layers = &[("base", 0), ("http", 0), ("http::*", 2), ("proxy", 2)];
        let m = |s: &str| -> Module { s.split("::").map(String::from).collect() };
        assert_eq!(layer_of(LAYERS, &m("http")), Some(0));
        assert_eq!(layer_of(LAYERS, &m("http::relay")), Some(2));
        assert_eq!(layer_of(LAYERS, &m("proxy::tunnel::frame")), Some(2));
        assert_eq!(layer_of(LAYERS, &m("admin")), None);
        let dir = std::env::temp_dir().join(format!("modgraph-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("http")).unwrap();
        for (file, text) in [
            ("lib.rs", "mod base; mod http; mod proxy;"),
            ("base.rs", "use crate::proxy::Tunnel;"),
            ("http/mod.rs", "pub enum Protocol {}"),
            ("proxy.rs", "use crate::http::Protocol;"),
        ] {
            std::fs::write(dir.join(file), text).unwrap();
        }
        let e = check_layers(&dir, LAYERS).unwrap_err().to_string();
        assert!(e.contains("base (layer 0) imports proxy (layer 2)"), "{e}");
        assert!(!e.contains("proxy (layer 2) imports"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_crates_of_this_workspace_have_no_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for krate in crate::LAYERED_CRATES {
            check(&root.join(krate).join("src")).unwrap();
        }
        check_layers(&root.join("mesh-node/src"), MESH_NODE_LAYERS).unwrap();
    }
}
