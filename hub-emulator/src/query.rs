//! The IoT Hub query language over device twins (`POST /devices/query`), in the subset
//! docs/hub-emulator.md section 5.1 lists. Parsed with sqlparser; anything outside the
//! subset is refused rather than answered differently from Azure.

use serde_json::{Map, Number, Value};
use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    InTarget, ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor, TopQuantity,
    UnaryOperator, Value as SqlValue,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Nesting limit handed to the parser: deep enough for any real filter, shallow enough
/// that parsing and evaluation stay well inside a 2 MB thread stack in debug builds.
const RECURSION_LIMIT: usize = 24;

/// Azure's documented limit on a query's length, in characters.
const MAX_CHARS: usize = 8192;

/// Most tokens other than literals and commas (**emulator choice**). Chains like
/// `a AND b AND ...` are parsed in a loop, not recursively, so only this bounds their
/// depth, which printing, dropping and evaluating the tree recurse over; long `IN`
/// lists stay possible.
const MAX_TOKENS: usize = 1000;

/// Deepest AND/OR/NOT nesting evaluated (**emulator choice**, as above).
const MAX_DEPTH: usize = 100;

/// Why a query is refused (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum QueryError {
    #[error("Query syntax error: {0}")]
    Syntax(String),
    #[error("Not supported by the emulator's query subset: {0}")]
    Unsupported(String),
    #[error("Invalid continuation token")]
    Continuation,
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, QueryError> {
    Err(QueryError::Unsupported(what.into()))
}

/// A property path in the twin document, e.g. `["tags", "location"]`.
type Path = Vec<String>;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Query {
    top: Option<u64>,
    select: Select,
    filter: Option<Cond>,
}

#[derive(Debug, Clone, PartialEq)]
enum Select {
    /// `SELECT *`: whole twins.
    All,
    /// `SELECT a.b, c AS d`.
    Fields(Vec<(Name, Path)>),
    /// `SELECT [paths,] COUNT() AS name ... [GROUP BY paths]`.
    Count {
        alias: String,
        /// The group-by paths; those not selected are `Hidden`.
        keys: Vec<(Name, Path)>,
    },
}

/// How a path's value is named in a result row.
#[derive(Debug, Clone, PartialEq)]
enum Name {
    Alias(String),
    /// The member's own name in the twin (Azure answers `SELECT DeviceId` with `deviceId`).
    Natural,
    Hidden,
}

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Cmp(Operand, CmpOp, Operand),
    In(Operand, Vec<Value>, bool),
    IsDefined(Path),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Path(Path),
    Lit(Value),
}

/// What the response's `x-ms-item-type` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemType {
    Twin,
    Json,
}

impl ItemType {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemType::Twin => "twin",
            ItemType::Json => "json",
        }
    }
}

impl Query {
    /// Parses `text`, refusing anything outside the subset.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        if text.chars().count() > MAX_CHARS {
            return unsupported(format!("queries longer than {MAX_CHARS} characters"));
        }
        let dialect = GenericDialect {};
        let tokens = Tokenizer::new(&dialect, text)
            .tokenize()
            .map_err(|e| QueryError::Syntax(e.to_string()))?
            .into_iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        let tokens = in_arrays(tokens)?;
        let weight = tokens
            .iter()
            .filter(|t| {
                !matches!(
                    t,
                    Token::Comma | Token::Number(..) | Token::SingleQuotedString(_)
                )
            })
            .count();
        if weight > MAX_TOKENS {
            return unsupported(format!(
                "queries of more than {MAX_TOKENS} operators and names"
            ));
        }
        let statements = Parser::new(&dialect)
            .with_recursion_limit(RECURSION_LIMIT)
            .with_tokens(tokens)
            .parse_statements()
            .map_err(|e| QueryError::Syntax(e.to_string()))?;
        let [Statement::Query(q)] = statements.as_slice() else {
            return unsupported("exactly one SELECT statement is expected");
        };
        // Everything but a plain SELECT body (ORDER BY, LIMIT, WITH, UNION, ...) is refused.
        let SetExpr::Select(sel) = q.body.as_ref() else {
            return unsupported("only a plain SELECT is supported");
        };
        if q.with.is_some()
            || q.order_by.is_some()
            || q.limit_clause.is_some()
            || q.fetch.is_some()
            || !q.locks.is_empty()
            || q.for_clause.is_some()
            || q.settings.is_some()
            || q.format_clause.is_some()
            || !q.pipe_operators.is_empty()
        {
            return unsupported("ORDER BY, LIMIT and other clauses are not supported");
        }
        let top = match &sel.top {
            None => None,
            Some(t) => match (&t.quantity, t.percent, t.with_ties) {
                (Some(TopQuantity::Constant(n)), false, false) => Some(*n),
                _ => return unsupported("TOP takes a plain integer"),
            },
        };
        let group_by = match &sel.group_by {
            GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => {
                exprs.iter().map(path).collect::<Result<Vec<_>, _>>()?
            }
            _ => return unsupported("GROUP BY ALL and modifiers"),
        };
        // The select's clauses this module reads, printed back; any other clause
        // (DISTINCT, HAVING, INTO, ...) makes the statement print differently.
        let mut known = String::from("SELECT");
        if let Some(t) = &sel.top {
            known.push_str(&format!(" {t}"));
        }
        known.push_str(&format!(" {}", joined(&sel.projection)));
        known.push_str(&format!(" FROM {}", joined(&sel.from)));
        if let Some(w) = &sel.selection {
            known.push_str(&format!(" WHERE {w}"));
        }
        if !group_by.is_empty() {
            known.push_str(&format!(
                " GROUP BY {}",
                joined(group_by_exprs(&sel.group_by))
            ));
        }
        if sel.to_string() != known {
            return unsupported("only SELECT [TOP n] ... FROM devices [WHERE ...] [GROUP BY ...]");
        }
        check_from(sel)?;
        let select = projection(&sel.projection, group_by)?;
        let filter = sel.selection.as_ref().map(|w| cond(w, 0)).transpose()?;
        Ok(Query {
            top,
            select,
            filter,
        })
    }

    /// `twin` for `SELECT *`, `json` otherwise.
    pub fn item_type(&self) -> ItemType {
        match self.select {
            Select::All => ItemType::Twin,
            _ => ItemType::Json,
        }
    }

    /// All result items over `twins` (service-side twin documents, in a stable order).
    pub fn run(&self, twins: impl IntoIterator<Item = Value>) -> Vec<Value> {
        let matching = twins.into_iter().filter(|t| {
            self.filter
                .as_ref()
                .is_none_or(|c| eval(c, t) == Some(true))
        });
        let mut out: Vec<Value> = match &self.select {
            Select::All => matching.collect(),
            Select::Fields(fields) => matching.map(|t| Value::Object(row(fields, &t))).collect(),
            Select::Count { alias, keys } => count(matching, alias, keys),
        };
        if let Some(n) = self.top {
            out.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        }
        out
    }
}

/// Azure writes `IN` lists as arrays, `x IN ['a', 'b']`, and has `NIN` for `NOT IN`;
/// sqlparser knows only `IN (...)`, so those tokens are rewritten to it before parsing.
fn in_arrays(tokens: Vec<Token>) -> Result<Vec<Token>, QueryError> {
    let mut out: Vec<Token> = Vec::with_capacity(tokens.len() + 1);
    let mut in_array = false;
    let mut iter = tokens.into_iter().peekable();
    while let Some(t) = iter.next() {
        let opens_list = matches!(iter.peek(), Some(Token::LBracket | Token::LParen));
        let after_period = matches!(out.last(), Some(Token::Period));
        let after_in = matches!(out.last(), Some(Token::Word(w)) if w.keyword == Keyword::IN);
        match t {
            Token::Word(w)
                if w.quote_style.is_none()
                    && w.value.eq_ignore_ascii_case("NIN")
                    && opens_list
                    && !after_period =>
            {
                out.push(Token::make_keyword("NOT"));
                out.push(Token::make_keyword("IN"));
            }
            Token::LBracket if after_in && !in_array => {
                in_array = true;
                out.push(Token::LParen);
            }
            Token::RBracket if in_array => {
                in_array = false;
                out.push(Token::RParen);
            }
            // Rewritten, `['a')` would pass as `('a')`.
            Token::RParen if in_array => {
                return Err(QueryError::Syntax("`[` closed by `)`".into()));
            }
            t => out.push(t),
        }
    }
    Ok(out)
}

fn joined<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn group_by_exprs(g: &GroupByExpr) -> &[Expr] {
    match g {
        GroupByExpr::Expressions(e, _) => e,
        GroupByExpr::All(_) => &[],
    }
}

fn check_from(sel: &sqlparser::ast::Select) -> Result<(), QueryError> {
    let [from] = sel.from.as_slice() else {
        return unsupported("FROM takes exactly one collection");
    };
    if !from.joins.is_empty() {
        return unsupported("JOIN");
    }
    let TableFactor::Table {
        name, alias: None, ..
    } = &from.relation
    else {
        return unsupported("FROM devices only");
    };
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(i)]
            if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("devices") =>
        {
            Ok(())
        }
        _ => unsupported(format!(
            "FROM {name}: only FROM devices (no modules, jobs or configurations)"
        )),
    }
}

/// The top-level twin members a query may name (those of `GET /twins/{id}`).
const ROOTS: &[&str] = &[
    "deviceId",
    "etag",
    "deviceEtag",
    "status",
    "statusUpdateTime",
    "connectionState",
    "lastActivityTime",
    "cloudToDeviceMessageCount",
    "authenticationType",
    "x509Thumbprint",
    "modelId",
    "version",
    "tags",
    "properties",
    "capabilities",
];

fn ident_path(idents: &[Ident]) -> Result<Path, QueryError> {
    if idents.iter().any(|i| i.quote_style.is_some()) {
        return unsupported("quoted property names");
    }
    let p: Path = idents.iter().map(|i| i.value.clone()).collect();
    let is = |i: usize, names: &[&str]| {
        p.get(i)
            .is_some_and(|s| names.iter().any(|n| n.eq_ignore_ascii_case(s)))
    };
    let allowed = if is(0, &["properties"]) {
        is(1, &["desired", "reported"])
    } else {
        is(0, ROOTS)
    };
    if !allowed {
        return unsupported(format!(
            "property {}: only the twin's members, tags.*, properties.desired.* and properties.reported.*",
            p.join(".")
        ));
    }
    Ok(p)
}

fn path(e: &Expr) -> Result<Path, QueryError> {
    match e {
        Expr::Identifier(i) => ident_path(std::slice::from_ref(i)),
        Expr::CompoundIdentifier(v) => ident_path(v),
        other => unsupported(format!("{other} is not a property path")),
    }
}

fn projection(items: &[SelectItem], group_by: Vec<Path>) -> Result<Select, QueryError> {
    if let [SelectItem::Wildcard(opts)] = items {
        if !group_by.is_empty() || opts.to_string() != "" {
            return unsupported("SELECT * takes no options or GROUP BY");
        }
        return Ok(Select::All);
    }
    let mut fields: Vec<(Name, Path)> = Vec::new();
    // Output names as written, to refuse two of one name (in any case).
    let mut names: Vec<String> = Vec::new();
    let mut count_alias = None;
    for item in items {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } if alias.quote_style.is_none() => {
                (expr, Some(alias.value.clone()))
            }
            _ => return unsupported(format!("select item {item}")),
        };
        if let Expr::Function(f) = expr {
            if is_call(f, "COUNT", 0).is_none() || count_alias.is_some() {
                return unsupported(format!("{f}: the only aggregate is one COUNT()"));
            }
            let Some(a) = alias else {
                return unsupported("COUNT() needs an alias (COUNT() AS name)");
            };
            names.push(a.to_ascii_lowercase());
            count_alias = Some(a);
            continue;
        }
        let p = path(expr)?;
        let written = alias.as_ref().or(p.last()).cloned().unwrap_or_default();
        names.push(written.to_ascii_lowercase());
        fields.push((alias.map_or(Name::Natural, Name::Alias), p));
    }
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return unsupported("two selected values with the same name (use AS)");
    }
    match count_alias {
        None if group_by.is_empty() => Ok(Select::Fields(fields)),
        None => unsupported("GROUP BY without COUNT()"),
        Some(alias) => {
            if let Some((_, p)) = fields
                .iter()
                .find(|(_, p)| !group_by.iter().any(|g| same_path(g, p)))
            {
                return unsupported(format!("{} is selected but not grouped by", p.join(".")));
            }
            let keys = group_by
                .into_iter()
                .map(|g| {
                    let name = fields
                        .iter()
                        .find(|(_, p)| same_path(p, &g))
                        .map_or(Name::Hidden, |(n, _)| n.clone());
                    (name, g)
                })
                .collect();
            Ok(Select::Count { alias, keys })
        }
    }
}

/// The arguments of a plain call of `name` with `arity` unnamed arguments.
fn is_call<'a>(f: &'a sqlparser::ast::Function, name: &str, arity: usize) -> Option<Vec<&'a Expr>> {
    let [ObjectNamePart::Identifier(n)] = f.name.0.as_slice() else {
        return None;
    };
    if !n.value.eq_ignore_ascii_case(name)
        || n.quote_style.is_some()
        || f.uses_odbc_syntax
        || !matches!(f.parameters, FunctionArguments::None)
        || f.filter.is_some()
        || f.null_treatment.is_some()
        || f.over.is_some()
        || !f.within_group.is_empty()
    {
        return None;
    }
    let args: &[FunctionArg] = match &f.args {
        FunctionArguments::List(l) if l.duplicate_treatment.is_none() && l.clauses.is_empty() => {
            &l.args
        }
        _ => return None,
    };
    let exprs: Vec<&Expr> = args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    (exprs.len() == args.len() && exprs.len() == arity).then_some(exprs)
}

fn cond(e: &Expr, depth: usize) -> Result<Cond, QueryError> {
    if depth > MAX_DEPTH {
        return unsupported(format!("conditions nested deeper than {MAX_DEPTH}"));
    }
    let sub = |e: &Expr| cond(e, depth + 1).map(Box::new);
    match e {
        Expr::Nested(inner) => cond(inner, depth + 1),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Cond::Not(sub(expr)?)),
        Expr::BinaryOp { left, op, right } => {
            let cmp = match op {
                BinaryOperator::And => return Ok(Cond::And(sub(left)?, sub(right)?)),
                BinaryOperator::Or => return Ok(Cond::Or(sub(left)?, sub(right)?)),
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::Ne,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::Le,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::Ge,
                other => return unsupported(format!("operator {other}")),
            };
            Ok(Cond::Cmp(operand(left)?, cmp, operand(right)?))
        }
        Expr::In {
            expr,
            target: InTarget::List(list),
            negated,
            global: false,
        } => {
            let values = list
                .iter()
                .map(|v| match operand(v)? {
                    Operand::Lit(l) => Ok(l),
                    Operand::Path(_) => unsupported("IN takes literals only"),
                })
                .collect::<Result<_, _>>()?;
            Ok(Cond::In(operand(expr)?, values, *negated))
        }
        Expr::Function(f) => match is_call(f, "IS_DEFINED", 1).as_deref() {
            Some([arg]) => Ok(Cond::IsDefined(path(arg)?)),
            _ => unsupported(format!(
                "{f}: the only function in WHERE is IS_DEFINED(path)"
            )),
        },
        other => unsupported(format!("condition {other}")),
    }
}

fn operand(e: &Expr) -> Result<Operand, QueryError> {
    match e {
        Expr::Nested(inner) => operand(inner),
        Expr::Value(v) => Ok(Operand::Lit(literal(&v.value, false)?)),
        // Azure's string literals take double quotes too; sqlparser reads them as names.
        Expr::Identifier(i) if i.quote_style == Some('"') => {
            Ok(Operand::Lit(string(&i.value, '"')?))
        }
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match expr.as_ref() {
            Expr::Value(v) => Ok(Operand::Lit(literal(&v.value, true)?)),
            _ => unsupported(format!("-{expr}")),
        },
        _ => Ok(Operand::Path(path(e)?)),
    }
}

fn literal(v: &SqlValue, negative: bool) -> Result<Value, QueryError> {
    let v = match v {
        SqlValue::Number(n, false) => {
            let text = if negative { format!("-{n}") } else { n.clone() };
            let n: Number = text
                .parse()
                .map_err(|_| QueryError::Unsupported(format!("number {text}")))?;
            return Ok(Value::Number(n));
        }
        SqlValue::SingleQuotedString(s) => string(s, '\'')?,
        SqlValue::Boolean(b) => Value::Bool(*b),
        SqlValue::Null => Value::Null,
        other => return unsupported(format!("literal {other}")),
    };
    if negative {
        return unsupported("minus before a non-number");
    }
    Ok(v)
}

/// A string literal's value. Azure escapes with backslashes, SQL by doubling the
/// quote; the two read such literals differently, so they are refused.
fn string(s: &str, quote: char) -> Result<Value, QueryError> {
    if s.contains('\\') || s.contains(quote) {
        return unsupported("escapes in string literals");
    }
    Ok(Value::String(s.to_string()))
}

/// The member at `p` in a twin document, with its name as the twin spells it; `None`
/// when undefined. Names match in any case, as in Azure's `SELECT DeviceId` example
/// (an exact match wins).
fn lookup_entry<'a>(twin: &'a Value, p: &[String]) -> Option<(&'a str, &'a Value)> {
    let mut entry = None;
    let mut v = twin;
    for k in p {
        let m = v.as_object()?;
        let (name, next) = m
            .get_key_value(k)
            .or_else(|| m.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)))?;
        entry = Some((name.as_str(), next));
        v = next;
    }
    entry
}

fn lookup<'a>(twin: &'a Value, p: &[String]) -> Option<&'a Value> {
    lookup_entry(twin, p).map(|(_, v)| v)
}

/// The named members of `twin` at the paths; undefined ones are left out.
fn row(fields: &[(Name, Path)], twin: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    for (name, p) in fields {
        if let Some((natural, v)) = lookup_entry(twin, p) {
            match name {
                Name::Alias(a) => m.insert(a.clone(), v.clone()),
                Name::Natural => m.insert(natural.to_string(), v.clone()),
                Name::Hidden => None,
            };
        }
    }
    m
}

fn same_path(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// Three-valued evaluation as in Azure's (Cosmos DB's) query language: `None` is
/// undefined (a missing property, or a comparison between different JSON types), and
/// only `Some(true)` selects a twin.
fn eval(c: &Cond, twin: &Value) -> Option<bool> {
    match c {
        Cond::And(a, b) => match (eval(a, twin), eval(b, twin)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Cond::Or(a, b) => match (eval(a, twin), eval(b, twin)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Cond::Not(a) => eval(a, twin).map(|b| !b),
        Cond::Cmp(l, op, r) => compare(resolve(l, twin)?, *op, resolve(r, twin)?),
        Cond::In(l, list, negated) => {
            let v = resolve(l, twin)?;
            let found = list.iter().any(|x| compare(v, CmpOp::Eq, x) == Some(true));
            Some(found != *negated)
        }
        Cond::IsDefined(p) => Some(lookup(twin, p).is_some()),
    }
}

fn resolve<'a>(o: &'a Operand, twin: &'a Value) -> Option<&'a Value> {
    match o {
        Operand::Path(p) => lookup(twin, p),
        Operand::Lit(v) => Some(v),
    }
}

fn compare(a: &Value, op: CmpOp, b: &Value) -> Option<bool> {
    use std::cmp::Ordering;
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?)?,
        (Value::String(x), Value::String(y)) => x.cmp(y),
        // Booleans and nulls compare for equality only; objects and arrays not at all.
        (Value::Bool(x), Value::Bool(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => x.cmp(y),
        (Value::Null, Value::Null) if matches!(op, CmpOp::Eq | CmpOp::Ne) => Ordering::Equal,
        _ => return None,
    };
    Some(match op {
        CmpOp::Eq => ord.is_eq(),
        CmpOp::Ne => ord.is_ne(),
        CmpOp::Lt => ord.is_lt(),
        CmpOp::Le => ord.is_le(),
        CmpOp::Gt => ord.is_gt(),
        CmpOp::Ge => ord.is_ge(),
    })
}

/// `COUNT()` rows: one without keys, else one per distinct key tuple in order of first
/// appearance; an undefined key is left out of its row.
fn count(twins: impl Iterator<Item = Value>, alias: &str, keys: &[(Name, Path)]) -> Vec<Value> {
    /// One group: its key values, and its row's key members from its first twin.
    struct Group {
        key: Vec<Option<Value>>,
        row: Map<String, Value>,
        count: u64,
    }
    let mut groups: Vec<Group> = Vec::new();
    for t in twins {
        let key: Vec<Option<Value>> = keys.iter().map(|(_, p)| lookup(&t, p).cloned()).collect();
        match groups.iter_mut().find(|g| g.key == key) {
            Some(g) => g.count += 1,
            None => groups.push(Group {
                row: row(keys, &t),
                key,
                count: 1,
            }),
        }
    }
    if keys.is_empty() && groups.is_empty() {
        groups.push(Group {
            key: Vec::new(),
            row: Map::new(),
            count: 0,
        });
    }
    groups
        .into_iter()
        .map(|mut g| {
            g.row.insert(alias.to_string(), g.count.into());
            Value::Object(g.row)
        })
        .collect()
}

/// One page of results and the continuation token for the next, if any.
#[derive(Debug, PartialEq)]
pub(crate) struct Page {
    pub items: Vec<Value>,
    pub continuation: Option<String>,
}

/// Cuts `results` into pages of `max` items. The token is the offset of the next page
/// (opaque to clients; an emulator choice).
pub(crate) fn page(
    mut results: Vec<Value>,
    token: Option<&str>,
    max: usize,
) -> Result<Page, QueryError> {
    let start = match token {
        None => 0,
        Some(t) => t
            .strip_prefix("offset-")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or(QueryError::Continuation)?,
    };
    let max = max.max(1);
    let end = start.saturating_add(max);
    let continuation = (end < results.len()).then(|| format!("offset-{end}"));
    results.truncate(end);
    let items = results.into_iter().skip(start).collect();
    Ok(Page {
        items,
        continuation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twins() -> Vec<Value> {
        vec![
            json!({"deviceId": "a", "status": "enabled", "connectionState": "Connected",
                   "tags": {"location": "plant1", "floor": 1},
                   "properties": {"desired": {"rate": 5}, "reported": {"temp": 20.5, "ok": true, "fw": "1.0"}}}),
            json!({"deviceId": "b", "status": "disabled", "connectionState": "Disconnected",
                   "tags": {"location": "plant2", "floor": "1"},
                   "properties": {"desired": {}, "reported": {"temp": 30, "ok": false, "fw": null}}}),
            json!({"deviceId": "c", "status": "enabled", "connectionState": "Disconnected",
                   "properties": {"desired": {}, "reported": {}}}),
        ]
    }

    /// Device ids selected by `SELECT * FROM devices WHERE {filter}`.
    fn ids(filter: &str) -> Vec<String> {
        let q = Query::parse(&format!("SELECT * FROM devices WHERE {filter}")).unwrap();
        q.run(twins())
            .iter()
            .map(|t| t["deviceId"].as_str().unwrap().to_string())
            .collect()
    }

    fn refused(text: &str) -> bool {
        matches!(
            Query::parse(text),
            Err(QueryError::Unsupported(_) | QueryError::Syntax(_))
        )
    }

    #[test]
    fn select_all_returns_whole_twins() {
        let q = Query::parse("SELECT * FROM devices").unwrap();
        assert_eq!(q.item_type(), ItemType::Twin);
        assert_eq!(q.run(twins()), twins());
        // Keywords and the collection name in any case.
        assert_eq!(
            Query::parse("select * from DEVICES")
                .unwrap()
                .run(twins())
                .len(),
            3
        );
    }

    #[test]
    fn each_comparison_operator() {
        assert_eq!(ids("tags.location = 'plant1'"), ["a"]);
        assert_eq!(ids("tags.location != 'plant1'"), ["b"]);
        assert_eq!(ids("tags.location <> 'plant1'"), ["b"]);
        assert_eq!(ids("properties.reported.temp < 30"), ["a"]);
        assert_eq!(ids("properties.reported.temp <= 30"), ["a", "b"]);
        assert_eq!(ids("properties.reported.temp > 20.5"), ["b"]);
        assert_eq!(ids("properties.reported.temp >= 20.5"), ["a", "b"]);
        assert_eq!(ids("properties.reported.temp > -1"), ["a", "b"]);
        assert_eq!(ids("properties.desired.rate = 5"), ["a"]);
        assert_eq!(ids("deviceId >= 'b'"), ["b", "c"]);
        assert_eq!(ids("status = 'enabled'"), ["a", "c"]);
        assert_eq!(ids("connectionState = 'Connected'"), ["a"]);
        assert_eq!(ids("properties.reported.ok = true"), ["a"]);
        assert_eq!(ids("properties.reported.ok != true"), ["b"]);
        assert_eq!(ids("properties.reported.fw = null"), ["b"]);
        // Literal on the left.
        assert_eq!(ids("30 = properties.reported.temp"), ["b"]);
    }

    #[test]
    fn different_types_and_missing_paths_never_match() {
        // floor is a number on a, a string on b.
        assert_eq!(ids("tags.floor = 1"), ["a"]);
        assert_eq!(ids("tags.floor = '1'"), ["b"]);
        assert_eq!(ids("tags.floor != 1"), Vec::<String>::new());
        assert_eq!(ids("properties.reported.ok < true"), Vec::<String>::new());
        assert_eq!(ids("properties.reported.fw > null"), Vec::<String>::new());
        assert_eq!(ids("tags = 'x'"), Vec::<String>::new());
        // c has no tags: undefined, and NOT undefined is still undefined.
        assert_eq!(ids("NOT tags.location = 'plant1'"), ["b"]);
        assert_eq!(ids("tags.missing.deeper = 1"), Vec::<String>::new());
    }

    #[test]
    fn logic_and_parentheses() {
        assert_eq!(
            ids("status = 'enabled' AND tags.location = 'plant1'"),
            ["a"]
        );
        assert_eq!(
            ids("tags.location = 'plant2' OR deviceId = 'c'"),
            ["b", "c"]
        );
        assert_eq!(ids("NOT (status = 'enabled')"), ["b"]);
        assert_eq!(
            ids("(deviceId = 'a' OR deviceId = 'b') AND NOT properties.reported.ok = false"),
            ["a"]
        );
        // undefined OR true is true; undefined AND false is false.
        assert_eq!(ids("tags.location = 'x' OR deviceId = 'c'"), ["c"]);
        assert_eq!(
            ids("NOT (tags.location = 'x' AND deviceId = 'z')"),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn is_defined_and_in() {
        assert_eq!(ids("IS_DEFINED(tags.location)"), ["a", "b"]);
        assert_eq!(ids("NOT is_defined(tags)"), ["c"]);
        assert_eq!(ids("IS_DEFINED(properties.reported.fw)"), ["a", "b"]);
        assert_eq!(ids("deviceId IN ('a', 'c', 1)"), ["a", "c"]);
        assert_eq!(ids("deviceId NOT IN ('a')"), ["b", "c"]);
        assert_eq!(ids("tags.location NOT IN ('plant1')"), ["b"]);
        assert_eq!(ids("properties.reported.temp IN (30, 40)"), ["b"]);
    }

    #[test]
    fn azure_array_lists_double_quotes_and_any_case_names() {
        assert_eq!(ids("deviceId IN ['a', 'c']"), ["a", "c"]);
        assert_eq!(ids("deviceId NIN ['a', 'c']"), ["b"]);
        assert_eq!(ids("deviceId nin ('a')"), ["b", "c"]);
        assert_eq!(ids("tags.location = \"plant2\""), ["b"]);
        assert_eq!(ids("DeviceID IN (\"b\", 'c')"), ["b", "c"]);
        assert_eq!(
            ids("TAGS.Location = 'plant1' AND Properties.Reported.TEMP > 20"),
            ["a"]
        );
        let q = Query::parse("SELECT DeviceId, Tags.Location FROM DEVICES WHERE deviceId = 'a'")
            .unwrap();
        assert_eq!(
            q.run(twins()),
            [json!({"deviceId": "a", "location": "plant1"})]
        );
        // The limit Azure documents, in characters.
        let long = format!(
            "SELECT * FROM devices WHERE deviceId IN ({}'a')",
            "'a', ".repeat(1620)
        );
        assert!(long.len() <= MAX_CHARS);
        assert_eq!(Query::parse(&long).unwrap().run(twins()).len(), 1);
        let too_long = format!("{long}{}", " ".repeat(MAX_CHARS));
        assert!(refused(&too_long));
    }

    #[test]
    fn azure_documentation_examples_parse() {
        for text in [
            "SELECT * FROM devices WHERE tags.location.region = 'US'",
            "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60",
            "SELECT * FROM devices WHERE properties.reported.connectivity IN ['wired', 'wifi']",
            "SELECT * FROM devices WHERE is_defined(properties.reported.connectivity)",
            "SELECT * FROM devices WHERE properties.reported.connectivity.type = 'cellular'",
            "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices GROUP BY properties.reported.telemetryConfig.status",
            "SELECT COUNT() as totalNumberOfDevices FROM devices",
            "SELECT DeviceId, LastActivityTime FROM devices WHERE status = 'enabled' AND connectionState = 'Disconnected'",
            // Keywords as member names.
            "SELECT tags.order, tags.value FROM devices WHERE tags.type = 'x' OR tags.select.from = 1",
        ] {
            assert!(
                Query::parse(text).is_ok(),
                "{text}: {:?}",
                Query::parse(text)
            );
        }
    }

    #[test]
    fn projections() {
        let q = Query::parse(
            "SELECT deviceId, tags.location, properties.reported.temp AS t FROM devices WHERE status = 'enabled'",
        )
        .unwrap();
        assert_eq!(q.item_type(), ItemType::Json);
        assert_eq!(
            q.run(twins()),
            [
                json!({"deviceId": "a", "location": "plant1", "t": 20.5}),
                json!({"deviceId": "c"}),
            ]
        );
        assert!(refused(
            "SELECT tags.location, properties.reported.location FROM devices"
        ));
    }

    #[test]
    fn top_limits_the_result() {
        let q = Query::parse("SELECT TOP 2 deviceId FROM devices").unwrap();
        assert_eq!(
            q.run(twins()),
            [json!({"deviceId": "a"}), json!({"deviceId": "b"})]
        );
        let q = Query::parse("SELECT TOP 1 * FROM devices WHERE deviceId > 'a'").unwrap();
        assert_eq!(q.run(twins())[0]["deviceId"], "b");
        assert!(refused("SELECT TOP 10 PERCENT * FROM devices"));
        assert!(refused("SELECT TOP (1 + 1) * FROM devices"));
    }

    #[test]
    fn count_and_group_by() {
        let q = Query::parse("SELECT COUNT() AS numberOfDevices FROM devices").unwrap();
        assert_eq!(q.run(twins()), [json!({"numberOfDevices": 3})]);
        let q = Query::parse("SELECT COUNT() AS n FROM devices WHERE deviceId = 'zz'").unwrap();
        assert_eq!(q.run(twins()), [json!({"n": 0})]);
        let q = Query::parse("SELECT status, COUNT() AS n FROM devices GROUP BY status").unwrap();
        assert_eq!(
            q.run(twins()),
            [
                json!({"status": "enabled", "n": 2}),
                json!({"status": "disabled", "n": 1})
            ]
        );
        let q = Query::parse(
            "SELECT properties.reported.ok, COUNT() AS n FROM devices GROUP BY properties.reported.ok",
        )
        .unwrap();
        assert_eq!(
            q.run(twins()),
            [
                json!({"ok": true, "n": 1}),
                json!({"ok": false, "n": 1}),
                json!({"n": 1})
            ]
        );
        assert!(refused("SELECT COUNT() FROM devices"));
        assert!(refused("SELECT deviceId, COUNT() AS n FROM devices"));
        assert!(refused("SELECT deviceId FROM devices GROUP BY deviceId"));
        assert!(refused("SELECT COUNT(*) AS n FROM devices"));
    }

    #[test]
    fn paging_with_continuation() {
        let items: Vec<Value> = (0..5).map(|i| json!(i)).collect();
        let p1 = page(items.clone(), None, 2).unwrap();
        assert_eq!(p1.items, [json!(0), json!(1)]);
        let p2 = page(items.clone(), p1.continuation.as_deref(), 2).unwrap();
        assert_eq!(p2.items, [json!(2), json!(3)]);
        let p3 = page(items.clone(), p2.continuation.as_deref(), 2).unwrap();
        assert_eq!(
            p3,
            Page {
                items: vec![json!(4)],
                continuation: None
            }
        );
        assert_eq!(page(items.clone(), None, 5).unwrap().continuation, None);
        assert_eq!(
            page(items.clone(), Some("nonsense"), 2),
            Err(QueryError::Continuation)
        );
        assert_eq!(
            page(items, Some("offset-99"), 2).unwrap().items,
            Vec::<Value>::new()
        );
    }

    #[test]
    fn outside_the_subset_is_refused() {
        for text in [
            "SELECT * FROM devices.modules",
            "SELECT * FROM devices.jobs",
            "SELECT * FROM configurations",
            "SELECT * FROM devices d",
            "SELECT * FROM devices JOIN x ON devices.deviceId = x.deviceId",
            "SELECT * FROM devices, x",
            "SELECT * FROM devices WHERE STARTSWITH(deviceId, 'a')",
            "SELECT * FROM devices WHERE IS_DEFINED(tags.a, tags.b)",
            "SELECT * FROM devices WHERE deviceId LIKE 'a%'",
            "SELECT * FROM devices WHERE deviceId = 'a' + 'b'",
            "SELECT * FROM devices WHERE deviceId IN (SELECT 1)",
            "SELECT * FROM devices WHERE deviceId IN (tags.x)",
            "SELECT * FROM devices WHERE deviceId",
            "SELECT * FROM devices WHERE moduleId = 'x'",
            "SELECT * FROM devices WHERE jobs = 'x'",
            "SELECT * FROM devices WHERE deviceId = 'it''s'",
            "SELECT * FROM devices WHERE deviceId = 'a\\b'",
            "SELECT * FROM devices WHERE deviceId = \"a\\\"b\"",
            "SELECT * FROM devices WHERE deviceId IN [['a']]",
            "SELECT * FROM devices WHERE deviceId IN ['a'",
            "SELECT * FROM devices WHERE deviceId IN ['a')",
            "SELECT * FROM devices WHERE deviceId IN ('a']",
            "SELECT * FROM devices WHERE deviceId = undefined",
            "SELECT * FROM devices WHERE deviceId = 0x1F",
            "SELECT deviceId, DEVICEID FROM devices",
            "SELECT * FROM devices WHERE properties.x = 1",
            "SELECT * FROM devices WHERE \"tags\".x = 1",
            "SELECT * FROM devices ORDER BY deviceId",
            "SELECT * FROM devices LIMIT 1",
            "SELECT DISTINCT deviceId FROM devices",
            "SELECT * FROM devices HAVING COUNT() > 1",
            "SELECT * FROM devices UNION SELECT * FROM devices",
            "SELECT * FROM devices; SELECT * FROM devices",
            "SELECT *, deviceId FROM devices",
            "SELECT UPPER(deviceId) AS d FROM devices",
            "SELECT 1 FROM devices",
            "SELECT *",
            "DELETE FROM devices",
            "SELECT * FROM devices WHERE",
            "SELECT * FROM devices WHERE deviceId = 'a",
            "",
        ] {
            assert!(refused(text), "{text} was accepted");
        }
    }

    #[test]
    fn odd_input_never_panics() {
        let alphabet = b"SELECT*FROMdevicesWHEREtags.x=' ()!<>,INOTANDOR0123456789-\"[]$@;\\\n\t";
        for text in crate::util::garbage(7, 20_000, 80, alphabet) {
            let text = String::from_utf8_lossy(&text);
            if let Ok(q) = Query::parse(&text) {
                q.run(twins());
            }
        }
        for text in crate::util::garbage(11, 2_000, 40, b"SELECT * FROM devices WHERE ") {
            let prefix = "SELECT * FROM devices WHERE ";
            let _ = Query::parse(&format!("{prefix}{}", String::from_utf8_lossy(&text)));
        }
        // Deep nesting stops at the recursion limit instead of overflowing the stack.
        let deep = format!(
            "SELECT * FROM devices WHERE {}deviceId = 'a'{}",
            "(".repeat(5000),
            ")".repeat(5000)
        );
        assert!(refused(&deep));
        let deep_not = format!(
            "SELECT * FROM devices WHERE {}deviceId = 'a'",
            "NOT ".repeat(5000)
        );
        assert!(refused(&deep_not));
        let mixed = "SELECT * FROM devices WHERE -".repeat(1000);
        assert!(refused(&mixed));
        // Long flat chains: the deepest under the token limit, then far beyond it.
        let chain = |n: usize, op: &str| {
            format!(
                "SELECT * FROM devices WHERE {}deviceId = 'a'",
                format!("deviceId = 'a' {op} ").repeat(n)
            )
        };
        assert_eq!(
            Query::parse(&chain(100, "OR")).unwrap().run(twins()).len(),
            1
        );
        for n in [101, 490, 10_000, 100_000] {
            assert!(refused(&chain(n, "AND")), "{n}");
        }
        let flat = format!(
            "SELECT * FROM devices WHERE {}deviceId",
            "deviceId AND ".repeat(995)
        );
        assert!(refused(&flat));
        // The deepest trees the token limit lets through (numbers are not counted).
        for op in ["+", "-", "*", "=", "<"] {
            let sums = format!(
                "SELECT * FROM devices WHERE deviceId = {}1",
                format!("1 {op} ").repeat(MAX_TOKENS - 7)
            );
            assert!(refused(&sums), "{op}");
        }
        let ands = format!(
            "SELECT * FROM devices WHERE {}deviceId",
            "deviceId AND ".repeat(MAX_TOKENS / 2 - 3)
        );
        assert!(refused(&ands));
    }
}
