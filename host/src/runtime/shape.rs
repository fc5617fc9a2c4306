//! The pre-check of a module's shape before it is compiled: what makes compiling slow or
//! large (code size, function count, one function's size, operators, locals and nesting)
//! is counted by a single wasmparser pass, which costs milliseconds, and a module past a
//! limit is refused with the limit's name before any compile work is spent on it.

use serde::{Deserialize, Serialize};
use wasmparser::{Operator, Parser, Payload};

/// Bounds on a module's shape, checked before it is compiled (`[host.modules]`).
///
/// The defaults are far above what the examples need (over all of them, release builds:
/// at most 791 functions, 356 KiB of code, a function of 20 KiB and 8,139 operators, 52
/// locals, nesting 121). They bound the shapes whose compile time grows faster than their
/// size: a function of 20,000 nested loops took 12.7 s to compile, one of 300 takes 3 ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleLimits {
    /// Bytes of the component file.
    pub max_module_bytes: usize,
    /// Bytes of code over all functions of all core modules.
    pub max_code_bytes: usize,
    /// Functions (with bodies) over all core modules.
    pub max_functions: usize,
    /// Bytes of one function body.
    pub max_function_bytes: usize,
    /// Operators in one function body.
    pub max_function_operators: usize,
    /// Locals declared by one function.
    pub max_function_locals: u64,
    /// Blocks (`block`, `loop`, `if`, `try_table`) open inside each other in one function.
    pub max_nesting: usize,
    /// The longest a compile may take, s. A module's own deadline is 1 s plus
    /// `compile_ms_per_kib` per KiB of it, up to this; past it, the compile is stopped and
    /// the module refused. Only where the host compiles in a child process (`tether`).
    pub compile_max_secs: f64,
    /// Compile time allowed per KiB of module, ms (the examples take about 3 of CPU in a
    /// debug build).
    pub compile_ms_per_kib: f64,
}

impl Default for ModuleLimits {
    fn default() -> Self {
        ModuleLimits {
            max_module_bytes: 16 << 20,
            max_code_bytes: 12 << 20,
            max_functions: 50_000,
            max_function_bytes: 512 << 10,
            max_function_operators: 200_000,
            max_function_locals: 10_000,
            max_nesting: 300,
            compile_max_secs: 60.0,
            compile_ms_per_kib: 20.0,
        }
    }
}

/// Why a module's shape is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Past one of the limits: its `[host.modules]` name, the value found and the limit.
    #[error("module refused before compiling: {what} is {found}, over modules.{limit} = {max}")]
    OverLimit { limit: &'static str, what: String, found: u64, max: u64 },
    /// Not decodable WebAssembly.
    #[error("not valid WebAssembly: {0}")]
    Malformed(String),
}

/// What the pre-check counted, for reports and for choosing limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub code_bytes: usize,
    pub functions: usize,
    pub largest_function_bytes: usize,
    pub most_operators: usize,
    pub most_locals: u64,
    pub deepest_nesting: usize,
}

impl ModuleLimits {
    /// How long a module of `bytes` may take to compile.
    pub fn compile_deadline(&self, bytes: usize) -> std::time::Duration {
        let secs = 1.0 + self.compile_ms_per_kib * bytes as f64 / 1024.0 / 1000.0;
        std::time::Duration::try_from_secs_f64(secs.min(self.compile_max_secs).max(0.1)).unwrap_or(std::time::Duration::MAX)
    }

    /// Counts `bytes`' shape, stopping at the first limit passed.
    pub fn check(&self, bytes: &[u8]) -> Result<Shape, ShapeError> {
        over("max_module_bytes", "the module's size in bytes", bytes.len(), self.max_module_bytes)?;
        let mut shape = Shape::default();
        for payload in Parser::new(0).parse_all(bytes) {
            let Payload::CodeSectionEntry(body) = payload.map_err(malformed)? else { continue };
            let n = shape.functions;
            let size = body.range().len();
            shape.functions += 1;
            shape.code_bytes += size;
            over("max_functions", "the number of functions", shape.functions, self.max_functions)?;
            over("max_code_bytes", "the code size in bytes", shape.code_bytes, self.max_code_bytes)?;
            over("max_function_bytes", &format!("function {n}'s size in bytes"), size, self.max_function_bytes)?;
            shape.largest_function_bytes = shape.largest_function_bytes.max(size);

            let mut locals = 0u64;
            for entry in body.get_locals_reader().map_err(malformed)? {
                locals += u64::from(entry.map_err(malformed)?.0);
                over_u64("max_function_locals", &format!("function {n}'s locals"), locals, self.max_function_locals)?;
            }
            shape.most_locals = shape.most_locals.max(locals);

            let mut ops = body.get_operators_reader().map_err(malformed)?;
            let (mut count, mut depth) = (0usize, 0usize);
            while !ops.eof() {
                match ops.read().map_err(malformed)? {
                    Operator::Block { .. } | Operator::Loop { .. } | Operator::If { .. } | Operator::TryTable { .. } => {
                        depth += 1;
                        over("max_nesting", &format!("function {n}'s block nesting"), depth, self.max_nesting)?;
                        shape.deepest_nesting = shape.deepest_nesting.max(depth);
                    }
                    Operator::End => depth = depth.saturating_sub(1),
                    _ => {}
                }
                count += 1;
                over("max_function_operators", &format!("function {n}'s operator count"), count, self.max_function_operators)?;
            }
            shape.most_operators = shape.most_operators.max(count);
        }
        Ok(shape)
    }
}

fn over(limit: &'static str, what: &str, found: usize, max: usize) -> Result<(), ShapeError> {
    over_u64(limit, what, found as u64, max as u64)
}

fn over_u64(limit: &'static str, what: &str, found: u64, max: u64) -> Result<(), ShapeError> {
    if found > max {
        return Err(ShapeError::OverLimit { limit, what: what.to_owned(), found, max });
    }
    Ok(())
}

fn malformed(e: wasmparser::BinaryReaderError) -> ShapeError {
    ShapeError::Malformed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core module with one function of `depth` nested loops.
    fn nested_loops(depth: usize) -> Vec<u8> {
        let body = format!("{}{}", "(loop ".repeat(depth), ")".repeat(depth));
        wat_module(&format!("(module (func {body}))"))
    }

    fn wat_module(text: &str) -> Vec<u8> {
        wat::parse_str(text).expect("test module")
    }

    #[test]
    fn counts_the_shape_of_a_small_module() {
        let bytes = wat_module("(module (func (local i32 i64) (block (loop (br 1)))) (func))");
        let shape = ModuleLimits::default().check(&bytes).expect("in limits");
        assert_eq!(shape.functions, 2);
        assert_eq!(shape.deepest_nesting, 2);
        assert_eq!(shape.most_locals, 2);
    }

    #[test]
    fn deep_nesting_is_refused_by_name() {
        let limits = ModuleLimits { max_nesting: 100, ..ModuleLimits::default() };
        assert!(limits.check(&nested_loops(100)).is_ok());
        let err = limits.check(&nested_loops(101)).expect_err("over");
        assert!(matches!(err, ShapeError::OverLimit { limit: "max_nesting", found: 101, max: 100, .. }), "{err}");
        assert!(err.to_string().contains("modules.max_nesting"), "{err}");
    }

    #[test]
    fn each_limit_is_enforced() {
        let bytes = wat_module("(module (func (local i32 i32 i32) nop nop nop) (func) (func))");
        let cases: [(&str, ModuleLimits); 6] = [
            ("max_module_bytes", ModuleLimits { max_module_bytes: 10, ..Default::default() }),
            ("max_functions", ModuleLimits { max_functions: 2, ..Default::default() }),
            ("max_code_bytes", ModuleLimits { max_code_bytes: 5, ..Default::default() }),
            ("max_function_bytes", ModuleLimits { max_function_bytes: 3, ..Default::default() }),
            ("max_function_locals", ModuleLimits { max_function_locals: 2, ..Default::default() }),
            ("max_function_operators", ModuleLimits { max_function_operators: 3, ..Default::default() }),
        ];
        for (name, limits) in cases {
            match limits.check(&bytes) {
                Err(ShapeError::OverLimit { limit, .. }) => assert_eq!(limit, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut bytes = nested_loops(3);
        let len = bytes.len();
        bytes.truncate(len - 2);
        assert!(matches!(ModuleLimits::default().check(&bytes), Err(ShapeError::Malformed(_))));
    }
}
