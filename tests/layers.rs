//! The house rules, checked on the sources (docs/design.md, "Layers"):
//!
//! * no import cycle between the modules (files) of `vmm/src`, `hypervisor-shim/src`,
//!   `runtime/src` and `kernel/src`;
//! * in the VMM core (`vmm/src`) a module uses only modules of its own layer or below:
//!   `base`, `host` → `devices`, `policy` → `vmm` → `snapshot`, `report` → `control`; in the
//!   binary (`hypervisor-shim/src`) the tools never use the command line;
//! * no struct of the core has more than 4 `pub` fields (everything else is `pub(crate)`);
//! * the core's dependency tree has no plotting, histogram or progress-bar crate.
//!
//! Sources are parsed with `syn`. Every `crate::`, `super::` and `self::` path counts: in `use`
//! trees, in code, and inside macro invocations. Test modules (`#[cfg(test)]`) and files named
//! `tests.rs` are left out: a test may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

type Module = Vec<String>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// The module a file defines (`a/b.rs` and `a/b/mod.rs` are `a::b`; `lib.rs`, `main.rs` the root).
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("readable source dir").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") && p.file_name().is_some_and(|n| n != "tests.rs") {
            out.push(p);
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>().is_ok_and(|m| matches!(&m, syn::Meta::Path(p) if p.is_ident("test")))
    })
}

/// Collects the module paths a file names, relative to where they are named.
struct Paths {
    /// The module the code being visited is in (the file's module plus inline `mod`s).
    here: Module,
    /// Absolute module paths named (`crate::a::b::Item` → `[a, b, Item]`).
    found: Vec<Module>,
}

impl Paths {
    fn resolve(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else { return };
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.here.clone(),
            "super" => {
                let mut b = self.here.clone();
                b.pop();
                b
            }
            _ => return,
        };
        let mut rest = &segments[1..];
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        self.found.push(base);
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                if n.ident != "self" {
                    full.push(n.ident.to_string());
                }
                self.resolve(&full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.resolve(&full);
            }
            syn::UseTree::Glob(_) => self.resolve(prefix),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// `crate :: a :: b` sequences inside a macro's tokens.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let flat: Vec<proc_macro2::TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < flat.len() {
            match &flat[i] {
                proc_macro2::TokenTree::Group(g) => self.tokens(g.stream()),
                proc_macro2::TokenTree::Ident(id) if matches!(id.to_string().as_str(), "crate" | "super" | "self") => {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    loop {
                        match (flat.get(j), flat.get(j + 1), flat.get(j + 2)) {
                            (
                                Some(proc_macro2::TokenTree::Punct(a)),
                                Some(proc_macro2::TokenTree::Punct(b)),
                                Some(proc_macro2::TokenTree::Ident(next)),
                            ) if a.as_char() == ':' && b.as_char() == ':' => {
                                segs.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    if segs.len() > 1 {
                        self.resolve(&segs);
                    }
                    i = j.max(i + 1);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_cfg_test(&m.attrs) {
            return;
        }
        if let Some((_, items)) = &m.content {
            self.here.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.here.pop();
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_cfg_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_cfg_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_cfg_test(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segs);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }
}

/// The file-level import graph of the crate whose sources are in `src`: module → (module it
/// uses → one path naming it, for messages).
fn graph(src: &Path) -> BTreeMap<Module, BTreeMap<Module, String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<Module, PathBuf> = files.iter().map(|f| (module_of(src, f), f.clone())).collect();
    let resolve = |path: &Module| -> Option<Module> {
        (1..=path.len()).rev().map(|k| path[..k].to_vec()).find(|m| modules.contains_key(m))
    };
    let mut edges = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).expect("readable source");
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut paths = Paths { here: module.clone(), found: Vec::new() };
        for item in &ast.items {
            paths.visit_item(item);
        }
        let mut out: BTreeMap<Module, String> = BTreeMap::new();
        for p in paths.found {
            let Some(target) = resolve(&p) else { continue };
            let is_ancestor = target.len() < module.len() && module[..target.len()] == target[..];
            if target != *module && !is_ancestor {
                out.entry(target).or_insert_with(|| format!("crate::{}", p.join("::")));
            }
        }
        edges.insert(module.clone(), out);
    }
    edges
}

fn name(m: &Module) -> String {
    if m.is_empty() { "<root>".into() } else { m.join("/") }
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Module, BTreeMap<Module, String>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        edges: &'a BTreeMap<Module, BTreeMap<Module, String>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Module) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.edges[v].keys() {
            let Some((w, _)) = t.edges.get_key_value(w) else { continue };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn describe_cycles(src: &str) -> Vec<String> {
    let edges = graph(&root().join(src));
    cycles(&edges)
        .into_iter()
        .map(|comp| {
            let mut s = format!("{src}: cycle of {}:", comp.len());
            for a in &comp {
                for (b, via) in &edges[a] {
                    if comp.contains(b) {
                        s.push_str(&format!("\n    {} -> {} ({via})", name(a), name(b)));
                    }
                }
            }
            s
        })
        .collect()
}

#[test]
fn no_module_imports_another_in_a_circle() {
    let found: Vec<String> = ["vmm/src", "hypervisor-shim/src", "runtime/src", "kernel/src"]
        .iter()
        .flat_map(|s| describe_cycles(s))
        .collect();
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// The layer of a module of the core, by its top-level folder.
fn core_layer(m: &Module) -> Option<(usize, &'static str)> {
    Some(match m.first()?.as_str() {
        "base" | "host" => (0, "base"),
        "devices" | "policy" => (1, "devices/policy"),
        "vmm" => (2, "vmm"),
        "snapshot" | "report" => (3, "snapshot/report"),
        "control" => (4, "control"),
        other => {
            panic!("vmm/src/{other}: a top-level module outside the layer table (tests/layers.rs, docs/design.md)")
        }
    })
}

fn binary_layer(m: &Module) -> Option<(usize, &'static str)> {
    Some(match m.first()?.as_str() {
        "tools" => (0, "tools"),
        "cli" => (1, "cli"),
        other => panic!("hypervisor-shim/src/{other}: a top-level module outside the layer table (tests/layers.rs)"),
    })
}

fn upward_uses(src: &str, layer: fn(&Module) -> Option<(usize, &'static str)>) -> Vec<String> {
    let edges = graph(&root().join(src));
    let mut bad = Vec::new();
    for (a, uses) in &edges {
        let Some((la, na)) = layer(a) else { continue };
        for (b, via) in uses {
            if let Some((lb, nb)) = layer(b)
                && lb > la
            {
                bad.push(format!("{src}/{} ({na}) uses {} ({nb}, a higher layer) via {via}", name(a), name(b)));
            }
        }
    }
    bad
}

#[test]
fn every_module_uses_only_its_own_layer_or_below() {
    let mut bad = upward_uses("vmm/src", core_layer);
    bad.extend(upward_uses("hypervisor-shim/src", binary_layer));
    assert!(bad.is_empty(), "uses that go up a layer:\n{}", bad.join("\n"));
}

/// Structs of the core with more than 4 `pub` fields (`pub(crate)` and private ones do not count).
#[test]
fn no_core_struct_has_more_than_four_pub_fields() {
    struct Structs<'f> {
        file: &'f Path,
        bad: Vec<String>,
    }
    impl<'ast> Visit<'ast> for Structs<'_> {
        fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
            if !is_cfg_test(&m.attrs) {
                syn::visit::visit_item_mod(self, m);
            }
        }
        fn visit_item_struct(&mut self, s: &'ast syn::ItemStruct) {
            let public = s.fields.iter().filter(|f| matches!(f.vis, syn::Visibility::Public(_))).count();
            if public > 4 {
                self.bad.push(format!("{}: struct {} has {public} pub fields", self.file.display(), s.ident));
            }
        }
    }
    let mut files = Vec::new();
    rust_files(&root().join("vmm/src"), &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let ast = syn::parse_file(&std::fs::read_to_string(f).expect("readable")).expect("parses");
        let mut v = Structs { file: f, bad: Vec::new() };
        v.visit_file(&ast);
        bad.extend(v.bad);
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The packages `elastic-vmm` depends on (not its dev-dependencies), from `Cargo.lock`.
#[test]
fn the_core_links_no_plotting_histogram_or_progress_bar_crate() {
    let manifest: toml::Table =
        std::fs::read_to_string(root().join("vmm/Cargo.toml")).expect("vmm/Cargo.toml").parse().expect("toml");
    let lock: toml::Table =
        std::fs::read_to_string(root().join("Cargo.lock")).expect("Cargo.lock").parse().expect("toml");
    let packages = lock["package"].as_array().expect("packages");
    let deps_of = |name: &str| -> Vec<String> {
        packages
            .iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .flat_map(|p| p.get("dependencies").and_then(|d| d.as_array()).cloned().unwrap_or_default())
            .filter_map(|d| d.as_str().map(|s| s.split(' ').next().unwrap_or(s).to_string()))
            .collect()
    };
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = manifest["dependencies"].as_table().expect("dependencies").keys().cloned().collect();
    while let Some(d) = todo.pop() {
        if seen.insert(d.clone()) {
            todo.extend(deps_of(&d));
        }
    }
    assert!(seen.contains("kvm-ioctls"), "the walk found {seen:?}");
    for banned in ["plotters", "hdrhistogram", "indicatif"] {
        assert!(!seen.contains(banned), "elastic-vmm depends on {banned} (through {seen:?})");
    }
}
