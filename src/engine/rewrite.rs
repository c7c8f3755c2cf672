//! Load-time rewrites of the ONNX protobuf, before tract parses it.
//!
//! They live here, on the protobuf, rather than in the exporter so that any bundle
//! benefits, whoever made it (our export tool, optimum, onnxruntime's own
//! quantizer run by hand).
//!
//! 1. `dequantize_matmul_integer`: tract's native `MatMulInteger` path is 20–40×
//!    slower than fp32 on x86 CPUs without VNNI (it widens i8 to i16 per element).
//!    Each `DynamicQuantizeLinear → MatMulInteger → Cast → Mul` chain over a
//!    constant int8 weight becomes `MatMul(x, (Wq − zp)·scale)`. The bundle stays
//!    int8 on disk (small copy to the device); the expanded weight costs the same
//!    RAM as an fp32 model but runs fp32 kernels, and its logits are closer to the
//!    fp32 model than onnxruntime's own int8 path (no activation quantization).
//!    A weight shared by several nodes (ALBERT's shared layers) is expanded once.
//! 2. `fuse_tanh_gelu`: tract 0.23 leaves the exported tanh-GELU of ALBERT
//!    (`0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`) as eight element-wise ops with
//!    a scalar `powf`; one `Gelu(approximate="tanh")` node runs a fused kernel.
//! 3. `value_info` is dropped: quantized files carry symbolic shapes there that
//!    conflict with the concrete ones tract infers.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, GraphProto, NodeProto, TensorProto,
};

/// What the rewrites did, for the load log and the status message.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RewriteReport {
    pub matmul_integer_total: usize,
    pub matmul_integer_dequantized: usize,
    pub weights_dequantized: usize,
    pub gelu_fused: usize,
    pub nodes_removed: usize,
}

/// Which rewrites to apply; all by default. Turning one off is for comparing
/// against the unrewritten graph (tests, benchmarks), not for production.
#[derive(Debug, Clone, Copy)]
pub struct Rewrites {
    pub dequantize: bool,
    pub fuse_gelu: bool,
}

impl Default for Rewrites {
    fn default() -> Self {
        Rewrites {
            dequantize: true,
            fuse_gelu: true,
        }
    }
}

pub fn rewrite(graph: &mut GraphProto, which: Rewrites) -> RewriteReport {
    let mut report = RewriteReport::default();
    graph.value_info.clear();
    if which.dequantize {
        dequantize_matmul_integer(graph, &mut report);
    } else {
        report.matmul_integer_total = graph
            .node
            .iter()
            .filter(|n| n.op_type == "MatMulInteger")
            .count();
    }
    if which.fuse_gelu {
        fuse_tanh_gelu(graph, &mut report);
    }
    report.nodes_removed += remove_dead_nodes(graph);
    report
}

/// Which node produces each value, and which nodes read it.
struct Index {
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
}

impl Index {
    fn new(graph: &GraphProto) -> Index {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for o in &node.output {
                producer.insert(o.clone(), i);
            }
            for inp in &node.input {
                consumers.entry(inp.clone()).or_default().push(i);
            }
        }
        Index {
            producer,
            consumers,
        }
    }

    fn sole_consumer(&self, value: &str) -> Option<usize> {
        match self.consumers.get(value).map(|v| v.as_slice()) {
            Some([one]) => Some(*one),
            _ => None,
        }
    }
}

/// Constant values (initializers and the outputs of `Constant` nodes): the shape
/// of every one, the values of small ones only. Copying the weights here would
/// put another full copy of the model in memory at load.
struct Consts {
    dims: HashMap<String, Vec<i64>>,
    small: HashMap<String, TensorProto>,
}

/// Scales, zero points and GELU constants are scalars or one value per column.
const SMALL: usize = 1 << 16;

impl Consts {
    fn new(graph: &GraphProto) -> Consts {
        let mut consts = Consts {
            dims: HashMap::new(),
            small: HashMap::new(),
        };
        let named = graph.initializer.iter().map(|t| (&t.name, t)).chain(
            graph
                .node
                .iter()
                .filter(|n| n.op_type == "Constant" && !n.output.is_empty())
                .filter_map(|n| {
                    let t = n.attribute.iter().find(|a| a.name == "value")?.t.as_ref()?;
                    Some((&n.output[0], t))
                }),
        );
        for (name, t) in named {
            consts.dims.insert(name.clone(), t.dims.clone());
            if element_count(t) <= SMALL {
                consts.small.insert(name.clone(), t.clone());
            }
        }
        consts
    }

    fn contains(&self, name: &str) -> bool {
        self.dims.contains_key(name)
    }

    fn get(&self, name: &str) -> Option<&TensorProto> {
        self.small.get(name)
    }
}

fn element_count(t: &TensorProto) -> usize {
    t.dims.iter().product::<i64>().max(0) as usize
}

/// Reads a small integer or float tensor as f32 values, whatever its storage.
fn tensor_values(t: &TensorProto) -> Option<Vec<f32>> {
    let n = element_count(t);
    let dt = DataType::try_from(t.data_type).ok()?;
    let raw = &t.raw_data;
    let values: Vec<f32> = match dt {
        DataType::Float if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DataType::Float => t.float_data.clone(),
        DataType::Double if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Double => t.double_data.iter().map(|&d| d as f32).collect(),
        DataType::Int8 if !raw.is_empty() => raw.iter().map(|&b| b as i8 as f32).collect(),
        DataType::Uint8 if !raw.is_empty() => raw.iter().map(|&b| b as f32).collect(),
        DataType::Int8 | DataType::Uint8 | DataType::Int32 => {
            t.int32_data.iter().map(|&v| v as f32).collect()
        }
        DataType::Int64 if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        DataType::Int64 => t.int64_data.iter().map(|&v| v as f32).collect(),
        _ => return None,
    };
    (values.len() == n).then_some(values)
}

fn scalar(consts: &Consts, name: &str) -> Option<f32> {
    let t = consts.get(name)?;
    match tensor_values(t)?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

fn float_tensor(name: String, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name,
        dims,
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Replaces `MatMulInteger(DynamicQuantizeLinear(x), Wq, x_zp, w_zp) → Cast(float) →
/// Mul(·, x_scale·w_scale)` by `MatMul(x, W)` with `W = (Wq − w_zp)·w_scale`.
fn dequantize_matmul_integer(graph: &mut GraphProto, report: &mut RewriteReport) {
    let consts = Consts::new(graph);
    let index = Index::new(graph);
    // (weight, zero point, scale) → name of the expanded fp32 initializer.
    let mut expanded: HashMap<(String, String, String), String> = HashMap::new();
    let mut new_initializers = Vec::new();
    let mut replacements: Vec<(usize, NodeProto)> = Vec::new();
    let mut dead: HashSet<usize> = HashSet::new();

    for (mm_ix, mm) in graph.node.iter().enumerate() {
        if mm.op_type != "MatMulInteger" {
            continue;
        }
        report.matmul_integer_total += 1;
        let Some(plan) = match_dequant_chain(graph, &index, &consts, mm_ix) else {
            log::debug!(
                "MatMulInteger {:?} left as is: not a dynamic-quantization chain",
                mm.name
            );
            continue;
        };
        let key = (
            plan.weight.clone(),
            plan.weight_zp.clone().unwrap_or_default(),
            plan.weight_scale.clone(),
        );
        let weight_name = match expanded.get(&key) {
            Some(name) => name.clone(),
            None => {
                let Some(t) = dequantized_weight(graph, &consts, &plan) else {
                    log::debug!(
                        "MatMulInteger {:?} left as is: weight not readable",
                        mm.name
                    );
                    continue;
                };
                report.weights_dequantized += 1;
                let name = t.name.clone();
                new_initializers.push(t);
                expanded.insert(key, name.clone());
                name
            }
        };
        let node = NodeProto {
            name: format!("{}_dequantized", mm.name),
            op_type: "MatMul".into(),
            input: vec![plan.float_input.clone(), weight_name],
            output: vec![plan.output.clone()],
            ..Default::default()
        };
        // The new MatMul takes the place of the final Mul, which keeps the graph
        // topologically sorted: x is produced before DynamicQuantizeLinear reads it.
        replacements.push((plan.mul_ix, node));
        dead.insert(mm_ix);
        dead.insert(plan.cast_ix);
        report.matmul_integer_dequantized += 1;
    }
    for (ix, node) in replacements {
        graph.node[ix] = node;
    }
    // Only the chain's own nodes go here; the quantizer nodes feeding other
    // MatMulIntegers are left for dead-node removal once nothing reads them.
    let mut ix = 0;
    graph.node.retain(|_| {
        ix += 1;
        !dead.contains(&(ix - 1))
    });
    graph.initializer.extend(new_initializers);
}

struct DequantPlan {
    float_input: String,
    weight: String,
    weight_zp: Option<String>,
    weight_scale: String,
    cast_ix: usize,
    mul_ix: usize,
    output: String,
}

fn match_dequant_chain(
    graph: &GraphProto,
    index: &Index,
    consts: &Consts,
    mm_ix: usize,
) -> Option<DequantPlan> {
    let mm = &graph.node[mm_ix];
    let a = mm.input.first()?;
    let weight = mm.input.get(1)?;
    if !consts.contains(weight) {
        return None;
    }
    let dql = &graph.node[*index.producer.get(a)?];
    if dql.op_type != "DynamicQuantizeLinear" || dql.output.first()? != a {
        return None;
    }
    // MatMulInteger's optional inputs 2/3: activation zp must be the DQL's own.
    if let Some(a_zp) = mm.input.get(2).filter(|s| !s.is_empty()) {
        if dql.output.get(2)? != a_zp {
            return None;
        }
    }
    let weight_zp = mm.input.get(3).filter(|s| !s.is_empty()).cloned();
    if let Some(zp) = &weight_zp {
        consts.get(zp)?;
    }
    let cast_ix = index.sole_consumer(&mm.output[0])?;
    let cast = &graph.node[cast_ix];
    let to_float = cast
        .attribute
        .iter()
        .any(|a| a.name == "to" && a.i == DataType::Float as i64);
    if cast.op_type != "Cast" || !to_float {
        return None;
    }
    let mul_ix = index.sole_consumer(&cast.output[0])?;
    let mul = &graph.node[mul_ix];
    if mul.op_type != "Mul" || mul.input.len() != 2 {
        return None;
    }
    let scale = if mul.input[0] == cast.output[0] {
        &mul.input[1]
    } else {
        &mul.input[0]
    };
    // The combined scale is x_scale · w_scale, the first coming from the DQL.
    let scale_mul = &graph.node[*index.producer.get(scale)?];
    if scale_mul.op_type != "Mul" {
        return None;
    }
    let x_scale = dql.output.get(1)?;
    let weight_scale = match (&scale_mul.input[0], &scale_mul.input[1]) {
        (l, r) if l == x_scale && consts.contains(r) => r.clone(),
        (l, r) if r == x_scale && consts.contains(l) => l.clone(),
        _ => return None,
    };
    Some(DequantPlan {
        float_input: dql.input[0].clone(),
        weight: weight.clone(),
        weight_zp,
        weight_scale,
        cast_ix,
        mul_ix,
        output: mul.output[0].clone(),
    })
}

/// `(Wq − zp)·scale` for a `[K, N]` weight; zero point and scale are scalars or
/// per output column (`[N]`), the two layouts onnxruntime's quantizer writes.
fn dequantized_weight(
    graph: &GraphProto,
    consts: &Consts,
    plan: &DequantPlan,
) -> Option<TensorProto> {
    // Weights are read where they are, never copied: see `Consts`.
    let w = graph
        .initializer
        .iter()
        .find(|t| t.name == plan.weight)
        .or_else(|| consts.get(&plan.weight))?;
    if w.dims.len() != 2 {
        return None;
    }
    let n = w.dims[1] as usize;
    let q = tensor_values(w)?;
    // The int8 values as f32 are a transient copy of one weight at a time.
    let zp = match &plan.weight_zp {
        Some(name) => tensor_values(consts.get(name)?)?,
        None => vec![0.0],
    };
    let scale = tensor_values(consts.get(&plan.weight_scale)?)?;
    let per_column = |v: &[f32], col: usize| -> Option<f32> {
        match v.len() {
            1 => Some(v[0]),
            len if len == n => Some(v[col]),
            _ => None,
        }
    };
    // Validate the layouts once rather than per element.
    per_column(&zp, 0)?;
    per_column(&scale, 0)?;
    let values: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let col = i % n;
            (v - per_column(&zp, col).unwrap()) * per_column(&scale, col).unwrap()
        })
        .collect();
    Some(float_tensor(
        format!("{}_dequantized", plan.weight),
        w.dims.clone(),
        &values,
    ))
}

/// Finds `Mul(Mul(x, 0.5), Add(1, Tanh(Mul(Add(x, Mul(Pow(x, 3), 0.044715)), √(2/π)))))`
/// in any operand order and replaces the outer `Mul` by `Gelu(x, approximate="tanh")`.
fn fuse_tanh_gelu(graph: &mut GraphProto, report: &mut RewriteReport) {
    let consts = Consts::new(graph);
    let index = Index::new(graph);
    let node_of = |value: &str| index.producer.get(value).map(|&i| &graph.node[i]);
    let is_const = |value: &str, expected: f32| {
        scalar(&consts, value)
            .is_some_and(|v| (v - expected).abs() <= 1e-3 * expected.abs().max(1.0))
    };
    // For a binary node, the operand that is not the given constant.
    let other_than_const = |node: &NodeProto, expected: f32| -> Option<String> {
        match (&node.input[0], &node.input[1]) {
            (l, r) if is_const(r, expected) => Some(l.clone()),
            (l, r) if is_const(l, expected) => Some(r.clone()),
            _ => None,
        }
    };
    let sqrt_2_over_pi = (2.0f32 / std::f32::consts::PI).sqrt();

    // Walks from the Tanh input back to x, checking every constant on the way.
    let tanh_argument_x = |tanh: &NodeProto| -> Option<String> {
        let scaled = node_of(&tanh.input[0]).filter(|n| n.op_type == "Mul")?;
        let inner =
            node_of(&other_than_const(scaled, sqrt_2_over_pi)?).filter(|n| n.op_type == "Add")?;
        for (x, cubic) in [
            (&inner.input[0], &inner.input[1]),
            (&inner.input[1], &inner.input[0]),
        ] {
            let Some(cubic) = node_of(cubic).filter(|n| n.op_type == "Mul") else {
                continue;
            };
            let Some(pow) = other_than_const(cubic, 0.044715) else {
                continue;
            };
            let Some(pow) = node_of(&pow) else { continue };
            let is_cube =
                pow.op_type == "Pow" && pow.input.len() == 2 && is_const(&pow.input[1], 3.0);
            if is_cube && &pow.input[0] == x {
                return Some(x.clone());
            }
        }
        None
    };

    let mut replacements = Vec::new();
    for (out_ix, out) in graph.node.iter().enumerate() {
        if out.op_type != "Mul" || out.input.len() != 2 {
            continue;
        }
        for (half_x, one_plus) in [
            (&out.input[0], &out.input[1]),
            (&out.input[1], &out.input[0]),
        ] {
            let Some(add1) = node_of(one_plus).filter(|n| n.op_type == "Add") else {
                continue;
            };
            let Some(tanh_out) = other_than_const(add1, 1.0) else {
                continue;
            };
            let Some(tanh) = node_of(&tanh_out).filter(|n| n.op_type == "Tanh") else {
                continue;
            };
            let Some(x) = tanh_argument_x(tanh) else {
                continue;
            };
            let Some(half) = node_of(half_x).filter(|n| n.op_type == "Mul") else {
                continue;
            };
            if other_than_const(half, 0.5).as_deref() != Some(x.as_str()) {
                continue;
            }
            replacements.push((
                out_ix,
                NodeProto {
                    name: format!("{}_gelu_tanh", out.name),
                    op_type: "Gelu".into(),
                    input: vec![x],
                    output: out.output.clone(),
                    attribute: vec![tract_onnx::pb::AttributeProto {
                        name: "approximate".into(),
                        r#type: AttributeType::String as i32,
                        s: b"tanh".to_vec(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ));
            break;
        }
    }
    report.gelu_fused += replacements.len();
    for (ix, node) in replacements {
        graph.node[ix] = node;
    }
}

/// Drops nodes whose outputs nobody reads, repeatedly, so the quantizer and
/// GELU leftovers disappear without each rewrite tracking its own debris.
fn remove_dead_nodes(graph: &mut GraphProto) -> usize {
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut removed = 0;
    loop {
        let read: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
        let keep: Vec<bool> = graph
            .node
            .iter()
            .map(|n| {
                n.output
                    .iter()
                    .any(|o| !o.is_empty() && (read.contains(o) || outputs.contains(o)))
            })
            .collect();
        let before = graph.node.len();
        let mut it = keep.iter();
        graph.node.retain(|_| *it.next().unwrap());
        if graph.node.len() == before {
            break;
        }
        removed += before - graph.node.len();
    }
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    graph
        .initializer
        .retain(|t| read.contains(&t.name) || outputs.contains(&t.name));
    removed
}
