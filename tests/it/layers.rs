//! The layering of `docs/design.md` §1, checked on the source: no two modules import each other,
//! directly or through others. A cycle means a lower layer learned about a higher one (a
//! message type building itself from a boundary's error, say), which is how a clear structure
//! starts to rot; this test names the cycle so it is fixed where it starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules and the modules they import, read from `src/`. A module is a top-level module
/// (`crate::genesys`) or, inside a folder module, one of its files (`sim::api`, reached from its
/// siblings through `super::api`). Unit-test code (after `#[cfg(test)]`) is left out.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).expect("under src");
        let parts: Vec<String> = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|last| last == "tests") {
            continue;
        }
        let top = parts[0].clone();
        if matches!(top.as_str(), "lib" | "main") {
            continue;
        }
        // `sim/api.rs` is `sim::api`; `sim/mod.rs` is `sim` itself.
        let module = match parts.as_slice() {
            [_] => top.clone(),
            [_, last] if last == "mod" => top.clone(),
            [_, sub, ..] => format!("{top}::{sub}"),
            [] => unreachable!("a file has a name"),
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        // Comments name modules without importing them (doc links); test code may import anything.
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let code = code.as_str();
        let imports = graph.entry(module.clone()).or_default();
        for target in referenced(code, "crate::") {
            if target != top {
                imports.insert(target);
            }
        }
        // Inside a folder module, `super::api` is the sibling file `api.rs` (or folder `api/`).
        if module.contains("::") {
            for sibling in referenced(code, "super::") {
                let folder = src.join(&top);
                if folder.join(format!("{sibling}.rs")).exists() || folder.join(&sibling).is_dir() {
                    let target = format!("{top}::{sibling}");
                    if target != module {
                        imports.insert(target);
                    }
                }
            }
        }
    }
    graph
}

/// The first path segment after each occurrence of `prefix` (`crate::event::Outcome` → `event`).
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    code.match_indices(prefix)
        .filter(|(at, _)| {
            // `crate::` inside an identifier like `foocrate::` is not a path.
            code[..*at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        })
        .filter_map(|(at, _)| {
            let rest = &code[at + prefix.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && name.chars().next().is_some_and(char::is_lowercase))
                .then_some(name)
        })
        .collect()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// A cycle in `graph`, as the list of modules around it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search with the path kept: reaching a module already on the path closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = import_graph();
    assert!(
        graph.contains_key("pipeline") && graph["pipeline"].contains("genesys"),
        "the scan must see the pipeline import the Genesys boundary: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle: {} (see the layers in docs/design.md)",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    let cycle = find_cycle(&graph).expect("a → b → c → a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}
