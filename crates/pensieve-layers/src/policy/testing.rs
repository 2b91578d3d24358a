//! Policies for tests, written in WAT with the WIT embedded: no guest toolchain needed (feature
//! `testing`, for the server's tests; this crate's own tests use it too).

const WIT: &str = include_str!("../../wit/policy.wit");

/// A core module whose three exports have the given bodies (each must leave an i32 pointer
/// to its result on the stack; the result areas are at 0, 16 and 32).
pub fn core_policy(configure: &str, classify: &str, decide: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
            (memory (export "memory") 1)
            (global $heap (mut i32) (i32.const 1024))
            (data (i32.const 200) "rate_limit_errornot today")
            (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
                (local $p i32)
                ;; bump allocator: align up, then advance
                (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                                       (i32.sub (i32.const 0) (local.get 2))))
                (global.set $heap (i32.add (local.get $p) (local.get 3)))
                (local.get $p))
            (func (export "configure") (param i32 i32) (result i32) {configure})
            (func (export "classify") (param i64 i64 i32 i32 f32 i32 i64 i32 i64) (result i32) {classify})
            (func (export "decide") (param i32) (result i32) {decide}))"#
    );
    let mut module = wat::parse_str(wat).unwrap();
    let mut resolve = wit_parser::Resolve::default();
    let pkg = resolve.push_str("policy.wit", WIT).unwrap();
    let world = resolve.select_world(&[pkg], Some("admission-policy")).unwrap();
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8).unwrap();
    module
}

/// `configure` returns ok.
pub const OK: &str = "(i32.store8 (i32.const 0) (i32.const 0)) (i32.const 0)";
/// `classify` proposes nothing.
pub const NONE: &str = "(i32.store8 (i32.const 16) (i32.const 0)) (i32.const 16)";
/// `decide` admits.
pub const ADMIT: &str = "(i32.store8 (i32.const 32) (i32.const 0)) (i32.const 32)";
/// reject { status: 429, error-type: "rate_limit_error", message: "not today", retry-after: some(7) }
pub const REJECT: &str = "(i32.store8 (i32.const 32) (i32.const 1))
    (i32.store16 (i32.const 36) (i32.const 429))
    (i32.store (i32.const 40) (i32.const 200)) (i32.store (i32.const 44) (i32.const 16))
    (i32.store (i32.const 48) (i32.const 216)) (i32.store (i32.const 52) (i32.const 9))
    (i32.store8 (i32.const 56) (i32.const 1)) (i32.store (i32.const 60) (i32.const 7))
    (i32.const 32)";
