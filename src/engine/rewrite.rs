//! Load-time rewrites of the ONNX protobuf, before tract parses it.
//!
//! They live here, on the protobuf, rather than in the exporter so that any bundle
//! benefits, whoever made it (our export tool, optimum, onnxruntime's own
//! quantizer run by hand).
//!
//! 1. Quantized matmuls. Each `DynamicQuantizeLinear → MatMulInteger → Cast → Mul
//!    (→ Add bias)` chain over a constant int8 weight becomes, by [`Int8Rewrite`]:
//!    - `Fused`: one [`QMatMul`](super::qmatmul) node that keeps the weight int8,
//!      packed once for an int8 kernel (a quarter of the fp32 memory);
//!    - `Dequantize`: `MatMul(x, (Wq − zp)·scale)` on tract's fp32 kernels, for
//!      CPUs where no int8 kernel beats them. Logits are closer to the fp32 model
//!      than onnxruntime's int8 path (no activation quantization), and RAM is that
//!      of an fp32 model.
//!    - `Keep`: tract's own `MatMulInteger` (20–40× slower than fp32 on x86
//!      without VNNI: it widens i8 to i16 per element); for comparisons only.
//!
//!    A weight shared by several nodes (ALBERT's shared layers) is converted once.
//! 2. `fuse_tanh_gelu`: tract 0.23 leaves the exported tanh-GELU of ALBERT
//!    (`0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`) as eight element-wise ops with
//!    a scalar `powf`; one `Gelu(approximate="tanh")` node runs a fused kernel.
//!    `fuse_erf_gelu` turns BERT's and DistilBERT's five-node `0.5·x·(1 + erf(x/√2))`
//!    into `Gelu(x)`. Either, right after an int8 matmul, then runs in that
//!    matmul's epilogue, on values still in registers.
//! 3. `fuse_layer_norm`: each `LayerNormalization`, with the residual `Add` before
//!    it, becomes one [`LayerNorm`](super::layer_norm) node.
//! 4. `fuse_attention`: each head-split self-attention (reshapes and transposes into
//!    heads, `MatMul(Q, Kᵀ)`, scale, mask add, `Softmax`, `MatMul(·, V)`, transpose
//!    and reshape back) becomes one [`Attention`](super::attention) node.
//! 5. `value_info` is dropped: quantized files carry symbolic shapes there that
//!    conflict with the concrete ones tract infers.

use std::collections::{HashMap, HashSet};

use std::sync::Arc;

use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, AttributeProto, GraphProto, NodeProto,
    TensorProto,
};

use super::qmatmul::{self, ActivationRange, KernelKind, QWeights, Registry};

/// What the rewrites did, for the load log and the status message.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RewriteReport {
    pub matmul_integer_total: usize,
    pub matmul_integer_dequantized: usize,
    pub weights_dequantized: usize,
    /// Chains turned into one int8 `QMatMul` node.
    pub matmul_integer_fused: usize,
    /// Bias adds folded into those nodes.
    pub bias_fused: usize,
    /// Distinct int8 weight matrices packed, and their bytes in memory.
    pub weights_packed: usize,
    pub packed_weight_bytes: usize,
    /// The int8 kernels multiplying them (name → matrices).
    pub int8_kernels: std::collections::BTreeMap<String, usize>,
    /// GELUs (tanh or erf) computed in the epilogue of the int8 matmul before them.
    pub gelu_into_matmul: usize,
    /// `LayerNormalization` nodes run as one op, and residual adds folded into them.
    pub layer_norm_fused: usize,
    pub residual_add_fused: usize,
    /// GELU subgraphs (tanh or erf) turned into one `Gelu` node.
    pub gelu_fused: usize,
    /// Self-attention subgraphs run as one op.
    pub attention_fused: usize,
    pub nodes_removed: usize,
}

/// What becomes of a quantized matmul chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Rewrite {
    /// One int8 node on this kernel (chains it cannot take are dequantized).
    Fused {
        kernel: KernelKind,
        range: ActivationRange,
    },
    /// fp32 weights, tract's fp32 kernels.
    Dequantize,
    /// Left to tract's own `MatMulInteger`.
    Keep,
}

/// Which rewrites to apply. Turning one off is for comparing against the
/// unrewritten graph (tests, benchmarks), not for production.
#[derive(Debug, Clone, Copy)]
pub struct Rewrites {
    pub int8: Int8Rewrite,
    pub fuse_gelu: bool,
    pub fuse_layer_norm: bool,
    pub fuse_attention: bool,
}

impl Default for Rewrites {
    fn default() -> Self {
        Rewrites {
            int8: Int8Rewrite::Dequantize,
            fuse_gelu: true,
            fuse_layer_norm: true,
            fuse_attention: true,
        }
    }
}

impl Rewrites {
    /// Every rewrite, with the int8 path of `int8` with `kernel` (`None`: auto) on this CPU; see
    /// [`super::Int8Path::rewrite`] for what is refused.
    pub fn for_model(
        int8: super::Int8Path,
        kernel: Option<KernelKind>,
    ) -> std::result::Result<Rewrites, String> {
        Ok(Rewrites {
            int8: int8.rewrite(kernel)?,
            ..Rewrites::default()
        })
    }

    /// [`Rewrites::for_model`] with this CPU's kernel.
    pub fn for_path(int8: super::Int8Path) -> Rewrites {
        Rewrites::for_model(int8, None).expect("auto always has a rewrite")
    }
}

/// `registry` receives the packed weights of fused chains for tract's parser.
pub fn rewrite(graph: &mut GraphProto, which: Rewrites, registry: &mut Registry) -> RewriteReport {
    let mut report = RewriteReport::default();
    graph.value_info.clear();
    match which.int8 {
        Int8Rewrite::Fused { kernel, range } => {
            convert_matmul_integer(graph, &mut report, Some((kernel, range, registry)))
        }
        Int8Rewrite::Dequantize => convert_matmul_integer(graph, &mut report, None),
        Int8Rewrite::Keep => {
            report.matmul_integer_total = graph
                .node
                .iter()
                .filter(|n| n.op_type == "MatMulInteger")
                .count();
        }
    }
    if which.fuse_gelu {
        fuse_tanh_gelu(graph, &mut report);
        fuse_erf_gelu(graph, &mut report);
    }
    if which.fuse_gelu {
        // The GELU pattern's own nodes still read the matmul's output until the
        // dead ones go.
        report.nodes_removed += remove_dead_nodes(graph);
        report.gelu_into_matmul = fold_gelu_into_qmatmul(graph);
    }
    if which.fuse_layer_norm {
        fuse_layer_norm(graph, &mut report);
    }
    if which.fuse_attention {
        fuse_attention(graph, &mut report);
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

    /// Whether `value` is a scalar constant within 0.1 % of `expected` (exports
    /// round √2 and √(2/π) differently).
    fn is(&self, value: &str, expected: f32) -> bool {
        scalar(self, value).is_some_and(|v| (v - expected).abs() <= 1e-3 * expected.abs().max(1.0))
    }

    /// For a binary node, the operand that is not the constant `expected`.
    fn other_operand(&self, node: &NodeProto, expected: f32) -> Option<String> {
        match (&node.input[0], &node.input[1]) {
            (l, r) if self.is(r, expected) => Some(l.clone()),
            (l, r) if self.is(l, expected) => Some(r.clone()),
            _ => None,
        }
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
/// Mul(·, x_scale·w_scale)` by `MatMul(x, W)` with `W = (Wq − w_zp)·w_scale`, or,
/// given a kernel, by one `QMatMul` node that also takes the bias `Add` after it.
fn convert_matmul_integer(
    graph: &mut GraphProto,
    report: &mut RewriteReport,
    mut fuse: Option<(KernelKind, ActivationRange, &mut Registry)>,
) {
    let consts = Consts::new(graph);
    let index = Index::new(graph);
    // (weight, zero point, scale) → name of the expanded fp32 initializer.
    let mut expanded: HashMap<(String, String, String), String> = HashMap::new();
    // (weight, zero point, scale, bias) → registry key of the packed int8 weights.
    let mut packed: HashMap<(String, String, String, String), i64> = HashMap::new();
    let mut new_initializers = Vec::new();
    let mut replacements: Vec<(usize, NodeProto)> = Vec::new();
    let mut dead: HashSet<usize> = HashSet::new();

    let mut chains = Vec::new();
    for (mm_ix, mm) in graph.node.iter().enumerate() {
        if mm.op_type != "MatMulInteger" {
            continue;
        }
        report.matmul_integer_total += 1;
        match match_dequant_chain(graph, &index, &consts, mm_ix) {
            Some(plan) => chains.push((mm_ix, mm.name.clone(), plan)),
            None => log::debug!(
                "MatMulInteger {:?} left as is: not a dynamic-quantization chain",
                mm.name
            ),
        }
    }
    // Readers of each weight not yet converted: once none is left, the int8 copy in
    // the protobuf is freed at once rather than at the end, so packed and original
    // weights are never all in memory together (BERT-base: 85 MB each).
    let mut unconverted: HashMap<String, usize> = chains
        .iter()
        .map(|(_, _, plan)| {
            let readers = index.consumers.get(&plan.weight).map_or(0, Vec::len);
            (plan.weight.clone(), readers)
        })
        .collect();

    for (mm_ix, name, plan) in chains {
        if let Some((kernel, range, registry)) = fuse.as_mut() {
            let bias = match_bias(graph, &index, &consts, &plan);
            let key = (
                plan.weight.clone(),
                plan.weight_zp.clone().unwrap_or_default(),
                plan.weight_scale.clone(),
                bias.as_ref().map(|b| b.name.clone()).unwrap_or_default(),
            );
            let id = match packed.get(&key) {
                Some(id) => Some(*id),
                None => match packed_weight(graph, &consts, &plan, bias.as_ref(), *kernel) {
                    Ok(q) => {
                        report.weights_packed += 1;
                        report.packed_weight_bytes += q.bytes();
                        *report.int8_kernels.entry(q.kernel_name()).or_default() += 1;
                        let id = registry.insert(Arc::new(q));
                        packed.insert(key, id);
                        Some(id)
                    }
                    Err(why) => {
                        log::debug!("MatMulInteger {:?} dequantized instead: {why}", name);
                        None
                    }
                },
            };
            if let Some(id) = id {
                let (ix, output) = match &bias {
                    Some(b) => (b.add_ix, b.output.clone()),
                    None => (plan.mul_ix, plan.output.clone()),
                };
                let node = NodeProto {
                    name: format!("{}_int8", name),
                    op_type: qmatmul::ONNX_OP.into(),
                    input: vec![plan.float_input.clone()],
                    output: vec![output],
                    attribute: vec![
                        int_attribute(qmatmul::ATTR_KEY, id),
                        int_attribute(
                            qmatmul::ATTR_RANGE,
                            (*range == ActivationRange::Tensor) as i64,
                        ),
                    ],
                    ..Default::default()
                };
                // The node takes the place of the chain's last node, which keeps the
                // graph topologically sorted.
                replacements.push((ix, node));
                dead.insert(mm_ix);
                dead.insert(plan.cast_ix);
                if bias.is_some() {
                    dead.insert(plan.mul_ix);
                    report.bias_fused += 1;
                }
                report.matmul_integer_fused += 1;
                let left = unconverted.get_mut(&plan.weight).expect("counted above");
                *left -= 1;
                if *left == 0 {
                    if let Some(t) = graph.initializer.iter_mut().find(|t| t.name == plan.weight) {
                        t.raw_data = Vec::new();
                        t.int32_data = Vec::new();
                    }
                }
                continue;
            }
        }
        let key = (
            plan.weight.clone(),
            plan.weight_zp.clone().unwrap_or_default(),
            plan.weight_scale.clone(),
        );
        let weight_name = match expanded.get(&key) {
            Some(name) => name.clone(),
            None => {
                let Some(t) = dequantized_weight(graph, &consts, &plan) else {
                    log::debug!("MatMulInteger {:?} left as is: weight not readable", name);
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
            name: format!("{}_dequantized", name),
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

fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

/// The `Add(·, bias)` that follows a chain, when it is the chain's only reader and
/// the bias is a constant vector of the output width.
struct Bias {
    name: String,
    add_ix: usize,
    output: String,
    values: Vec<f32>,
}

fn match_bias(
    graph: &GraphProto,
    index: &Index,
    consts: &Consts,
    plan: &DequantPlan,
) -> Option<Bias> {
    let add_ix = index.sole_consumer(&plan.output)?;
    let add = &graph.node[add_ix];
    if add.op_type != "Add" || add.input.len() != 2 {
        return None;
    }
    let name = if add.input[0] == plan.output {
        &add.input[1]
    } else {
        &add.input[0]
    };
    let n = *consts.dims.get(&plan.weight)?.get(1)?;
    let t = consts.get(name)?;
    if t.dims != [n] {
        return None;
    }
    Some(Bias {
        name: name.clone(),
        add_ix,
        output: add.output[0].clone(),
        values: tensor_values(t)?,
    })
}

/// The chain's weight packed for an int8 kernel: int8 values with zero point 0
/// (onnxruntime's symmetric weight quantization), scale per tensor or column.
fn packed_weight(
    graph: &GraphProto,
    consts: &Consts,
    plan: &DequantPlan,
    bias: Option<&Bias>,
    kernel: KernelKind,
) -> Result<QWeights, String> {
    let w = graph
        .initializer
        .iter()
        .find(|t| t.name == plan.weight)
        .or_else(|| consts.get(&plan.weight))
        .ok_or("weight not readable")?;
    if w.dims.len() != 2 || w.data_type != DataType::Int8 as i32 {
        return Err(format!(
            "weight is not a 2-D int8 matrix (dims {:?}, type {})",
            w.dims, w.data_type
        ));
    }
    let (k, n) = (w.dims[0] as usize, w.dims[1] as usize);
    if let Some(zp) = &plan.weight_zp {
        let zp = consts
            .get(zp)
            .and_then(tensor_values)
            .ok_or("zero point not readable")?;
        if zp.iter().any(|&z| z != 0.0) {
            return Err("weight zero point is not 0 (asymmetric weights)".into());
        }
    }
    let scale = consts
        .get(&plan.weight_scale)
        .and_then(tensor_values)
        .ok_or("weight scale not readable")?;
    let values: Vec<i8> = if w.raw_data.is_empty() {
        w.int32_data.iter().map(|&v| v as i8).collect()
    } else {
        w.raw_data.iter().map(|&b| b as i8).collect()
    };
    QWeights::new(
        &values,
        k,
        n,
        &scale,
        bias.map(|b| b.values.as_slice()),
        kernel,
    )
    .map_err(|e| format!("{e:#}"))
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
    let sqrt_2_over_pi = (2.0f32 / std::f32::consts::PI).sqrt();

    // Walks from the Tanh input back to x, checking every constant on the way.
    let tanh_argument_x = |tanh: &NodeProto| -> Option<String> {
        let scaled = node_of(&tanh.input[0]).filter(|n| n.op_type == "Mul")?;
        let inner = node_of(&consts.other_operand(scaled, sqrt_2_over_pi)?)
            .filter(|n| n.op_type == "Add")?;
        for (x, cubic) in [
            (&inner.input[0], &inner.input[1]),
            (&inner.input[1], &inner.input[0]),
        ] {
            let Some(cubic) = node_of(cubic).filter(|n| n.op_type == "Mul") else {
                continue;
            };
            let Some(pow) = consts.other_operand(cubic, 0.044715) else {
                continue;
            };
            let Some(pow) = node_of(&pow) else { continue };
            let is_cube =
                pow.op_type == "Pow" && pow.input.len() == 2 && consts.is(&pow.input[1], 3.0);
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
            let Some(tanh_out) = consts.other_operand(add1, 1.0) else {
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
            if consts.other_operand(half, 0.5).as_deref() != Some(x.as_str()) {
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

/// Finds `Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)` (the order torch exports
/// `x·0.5·(1 + erf(x/√2))` in) or `Mul(Mul(x, 0.5), Add(Erf(…), 1))`, with
/// `Mul(x, 1/√2)` for the division and operands in any order, and replaces the last
/// `Mul` by `Gelu(x)` (exact). Anchored on the `Erf`, as tract's own fusion is.
fn fuse_erf_gelu(graph: &mut GraphProto, report: &mut RewriteReport) {
    let consts = Consts::new(graph);
    let index = Index::new(graph);
    let outputs: HashSet<&String> = graph.output.iter().map(|o| &o.name).collect();
    let node_of = |value: &str| index.producer.get(value).map(|&i| &graph.node[i]);
    // The one reader of `value`, when it has that type and `value` is internal.
    let next = |value: &str, op: &str| {
        index
            .sole_consumer(value)
            .filter(|_| !outputs.contains(&value.to_string()))
            .filter(|&i| graph.node[i].op_type == op)
    };
    let binary = |n: &NodeProto| n.input.len() == 2;
    let sqrt2 = std::f32::consts::SQRT_2;

    let mut replacements = Vec::new();
    for erf in graph.node.iter().filter(|n| n.op_type == "Erf") {
        let Some(scaled) = node_of(&erf.input[0]).filter(|n| binary(n)) else {
            continue;
        };
        let x = match scaled.op_type.as_str() {
            "Div" if consts.is(&scaled.input[1], sqrt2) => scaled.input[0].clone(),
            "Mul" => match consts.other_operand(scaled, 1.0 / sqrt2) {
                Some(x) => x,
                None => continue,
            },
            _ => continue,
        };
        let Some(add1) = next(&erf.output[0], "Add").map(|i| &graph.node[i]) else {
            continue;
        };
        if !binary(add1) || consts.other_operand(add1, 1.0).as_ref() != Some(&erf.output[0]) {
            continue;
        }
        let Some(prod_ix) = next(&add1.output[0], "Mul") else {
            continue;
        };
        let prod = &graph.node[prod_ix];
        if !binary(prod) {
            continue;
        }
        let factor = if prod.input[0] == add1.output[0] {
            &prod.input[1]
        } else {
            &prod.input[0]
        };
        let last = if *factor == x {
            // x·(1 + erf) then ·0.5.
            match next(&prod.output[0], "Mul") {
                Some(i)
                    if binary(&graph.node[i])
                        && consts.other_operand(&graph.node[i], 0.5).as_ref()
                            == Some(&prod.output[0]) =>
                {
                    i
                }
                _ => continue,
            }
        } else {
            // (x·0.5)·(1 + erf).
            let half = node_of(factor).filter(|n| n.op_type == "Mul" && binary(n));
            if half.and_then(|h| consts.other_operand(h, 0.5)).as_ref() != Some(&x) {
                continue;
            }
            prod_ix
        };
        replacements.push((
            last,
            NodeProto {
                name: format!("{}_gelu_erf", graph.node[last].name),
                op_type: "Gelu".into(),
                input: vec![x],
                output: graph.node[last].output.clone(),
                ..Default::default()
            },
        ));
    }
    report.gelu_fused += replacements.len();
    for (ix, node) in replacements {
        graph.node[ix] = node;
    }
}

/// `Gelu` (tanh or exact) of an int8 matmul's output, when it is that output's only
/// reader, moves into the matmul's epilogue.
fn fold_gelu_into_qmatmul(graph: &mut GraphProto) -> usize {
    let index = Index::new(graph);
    let outputs: HashSet<&String> = graph.output.iter().map(|o| &o.name).collect();
    let mut folds = Vec::new();
    for (ix, gelu) in graph.node.iter().enumerate() {
        if gelu.op_type != "Gelu" || gelu.input.len() != 1 {
            continue;
        }
        let approximate = gelu
            .attribute
            .iter()
            .find(|a| a.name == "approximate")
            .map_or(&b"none"[..], |a| &a.s[..]);
        let activation = match approximate {
            b"tanh" => qmatmul::Activation::GeluTanh,
            b"none" => qmatmul::Activation::GeluErf,
            _ => continue,
        };
        let x = &gelu.input[0];
        let Some(&mm) = index.producer.get(x) else {
            continue;
        };
        if graph.node[mm].op_type == qmatmul::ONNX_OP
            && index.sole_consumer(x) == Some(ix)
            && !outputs.contains(x)
        {
            folds.push((mm, ix, activation));
        }
    }
    let count = folds.len();
    let mut dead = HashSet::new();
    for (mm, gelu, activation) in folds {
        let output = graph.node[gelu].output[0].clone();
        let node = &mut graph.node[mm];
        node.output[0] = output;
        node.attribute.push(int_attribute(
            qmatmul::ATTR_ACTIVATION,
            activation.attribute(),
        ));
        dead.insert(gelu);
    }
    let mut ix = 0;
    graph.node.retain(|_| {
        ix += 1;
        !dead.contains(&(ix - 1))
    });
    count
}

/// `LayerNormalization(x, scale, bias)` over the last axis → one
/// [`LayerNorm`](super::layer_norm) node; when `x = Add(a, b)` and the norm is the
/// sum's only reader, the add goes into the node too.
fn fuse_layer_norm(graph: &mut GraphProto, report: &mut RewriteReport) {
    use super::layer_norm::{ATTR_EPSILON, ATTR_RESIDUAL, ONNX_OP};
    let index = Index::new(graph);
    let outputs: HashSet<&String> = graph.output.iter().map(|o| &o.name).collect();
    let mut replacements = Vec::new();
    for (ix, ln) in graph.node.iter().enumerate() {
        if ln.op_type != "LayerNormalization" || ln.input.len() != 3 {
            continue;
        }
        let attr = |name: &str| ln.attribute.iter().find(|a| a.name == name);
        let last_axis = attr("axis").is_none_or(|a| a.i == -1);
        let float_stash = attr("stash_type").is_none_or(|a| a.i == 1);
        // Mean and inverse deviation are extra outputs nobody reads in an encoder.
        let one_output =
            ln.output.iter().skip(1).all(|o| {
                o.is_empty() || (!index.consumers.contains_key(o) && !outputs.contains(o))
            });
        if !(last_axis && float_stash && one_output) {
            continue;
        }
        let epsilon = attr("epsilon").map_or(1e-5, |a| a.f);
        let x = &ln.input[0];
        let add = index
            .producer
            .get(x)
            .map(|&p| &graph.node[p])
            .filter(|n| n.op_type == "Add" && n.input.len() == 2)
            .filter(|_| index.sole_consumer(x) == Some(ix) && !outputs.contains(x));
        let mut input = match add {
            Some(add) => add.input.clone(),
            None => vec![x.clone()],
        };
        input.extend(ln.input[1..].iter().cloned());
        report.layer_norm_fused += 1;
        report.residual_add_fused += add.is_some() as usize;
        replacements.push((
            ix,
            NodeProto {
                name: format!("{}_fused", ln.name),
                op_type: ONNX_OP.into(),
                input,
                output: vec![ln.output[0].clone()],
                attribute: vec![
                    AttributeProto {
                        name: ATTR_EPSILON.into(),
                        r#type: AttributeType::Float as i32,
                        f: epsilon,
                        ..Default::default()
                    },
                    int_attribute(ATTR_RESIDUAL, add.is_some() as i64),
                ],
                ..Default::default()
            },
        ));
    }
    // The folded adds lose their reader and go with the dead nodes.
    for (ix, node) in replacements {
        graph.node[ix] = node;
    }
}

/// Self-attention → one [`Attention`](super::attention) node, for the form every
/// Hugging Face BERT-family export writes (BERT, ALBERT, DistilBERT, RoBERTa):
///
/// ```text
/// q, k, v: [B, S, H·D] ─Reshape [B, S, H, D]─Transpose─┐ (q: 0213, k: 0231, v: 0213)
/// MatMul(q, k) ─Mul/Div(scalar)─Add(mask)─Softmax(last)─MatMul(·, v)
///   ─Transpose 0213─Reshape [B, S, H·D]
/// ```
///
/// Anything else (a different layout, a mask not derived from `attention_mask`, an
/// intermediate read elsewhere) is left to tract as it is.
fn fuse_attention(graph: &mut GraphProto, report: &mut RewriteReport) {
    use super::attention::{ATTR_HEAD_DIM, ATTR_SCALE, ONNX_OP};
    let index = Index::new(graph);
    let consts = Consts::new(graph);
    let outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let node = |value: &str, op: &str| -> Option<usize> {
        let &p = index.producer.get(value)?;
        (graph.node[p].op_type == op).then_some(p)
    };
    // The value is read by this node alone and is not a graph output.
    let only =
        |value: &str, by: usize| index.sole_consumer(value) == Some(by) && !outputs.contains(value);
    let perm = |ix: usize| -> Vec<i64> {
        graph.node[ix]
            .attribute
            .iter()
            .find(|a| a.name == "perm")
            .map(|a| a.ints.clone())
            .unwrap_or_default()
    };
    // `Transpose(Reshape(x, [B, S, H, D]), perm)` → (x, H, D), H possibly -1
    // (inferred: newer exports write `view(B, S, -1, D)`).
    let heads_of = |value: &str, want: &[i64]| -> Option<(String, i64, i64)> {
        let t = node(value, "Transpose")?;
        if perm(t) != want {
            return None;
        }
        let r = node(&graph.node[t].input[0], "Reshape")?;
        let shape = shape_values(graph, &index, &consts, &graph.node[r].input[1])?;
        match shape.as_slice() {
            [_, _, Some(h), Some(d)] if (*h > 0 || *h == -1) && *d > 0 => {
                Some((graph.node[r].input[0].clone(), *h, *d))
            }
            _ => None,
        }
    };

    let mut replacements = Vec::new();
    for (sm_ix, sm) in graph.node.iter().enumerate() {
        if sm.op_type != "Softmax" {
            continue;
        }
        let axis = sm.attribute.iter().find(|a| a.name == "axis");
        if !axis.is_some_and(|a| a.i == -1 || a.i == 3) {
            continue;
        }
        let fused = (|| {
            let add = node(&sm.input[0], "Add").filter(|_| only(&sm.input[0], sm_ix))?;
            let add_in = &graph.node[add].input;
            // The scaled scores on one side (a scaled `MatMul`: the mask is often a
            // `Mul` too), the mask on the other.
            let (scaled, mask) = [(0, 1), (1, 0)].into_iter().find_map(|(s, m)| {
                let ix = index.producer.get(&add_in[s]).copied()?;
                let op = &graph.node[ix].op_type;
                let of_matmul = graph.node[ix]
                    .input
                    .iter()
                    .any(|i| node(i, "MatMul").is_some());
                ((op == "Mul" || op == "Div") && of_matmul).then(|| (ix, add_in[m].clone()))
            })?;
            if !only(&graph.node[scaled].output[0], add)
                || !from_attention_mask(graph, &index, &consts, &mask)
            {
                return None;
            }
            let sc = &graph.node[scaled];
            let (scores, scale) = if sc.op_type == "Div" {
                (sc.input[0].clone(), 1.0 / scalar(&consts, &sc.input[1])?)
            } else if let Some(c) = scalar(&consts, &sc.input[1]) {
                (sc.input[0].clone(), c)
            } else {
                (sc.input[1].clone(), scalar(&consts, &sc.input[0])?)
            };
            let qk = node(&scores, "MatMul").filter(|_| only(&scores, scaled))?;
            let (q, h, d) = heads_of(&graph.node[qk].input[0], &[0, 2, 1, 3])?;
            let (k, hk, dk) = heads_of(&graph.node[qk].input[1], &[0, 2, 3, 1])?;
            let pv = index.sole_consumer(&sm.output[0])?;
            let pv_node = &graph.node[pv];
            if pv_node.op_type != "MatMul" || pv_node.input[0] != sm.output[0] {
                return None;
            }
            let (v, hv, dv) = heads_of(&pv_node.input[1], &[0, 2, 1, 3])?;
            if (hk, dk) != (h, d) || (hv, dv) != (h, d) {
                return None;
            }
            let back = index.sole_consumer(&pv_node.output[0])?;
            if graph.node[back].op_type != "Transpose" || perm(back) != [0, 2, 1, 3] {
                return None;
            }
            let merge = index.sole_consumer(&graph.node[back].output[0])?;
            let merged = &graph.node[merge];
            if merged.op_type != "Reshape" {
                return None;
            }
            // Back to [B, S, H·D], the last axis spelt out or inferred.
            match shape_values(graph, &index, &consts, &merged.input[1])?.as_slice() {
                [_, _, Some(-1)] => {}
                [_, _, Some(hd)] if (h > 0 && *hd == h * d) || (h == -1 && hd % d == 0) => {}
                _ => return None,
            }
            Some((
                merge,
                NodeProto {
                    name: format!("{}_attention", sm.name),
                    op_type: ONNX_OP.into(),
                    input: vec![q, k, v, mask],
                    output: vec![merged.output[0].clone()],
                    attribute: vec![
                        int_attribute(ATTR_HEAD_DIM, d),
                        AttributeProto {
                            name: ATTR_SCALE.into(),
                            r#type: AttributeType::Float as i32,
                            f: scale,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
            ))
        })();
        if let Some(replacement) = fused {
            replacements.push(replacement);
        }
    }
    // The eleven nodes the new one replaces lose their reader and go with the
    // dead nodes.
    report.attention_fused += replacements.len();
    for (ix, node) in replacements {
        graph.node[ix] = node;
    }
}

/// The values of a shape operand: a constant, or a `Concat` of one-element
/// pieces where only the constant ones are known (`None`: computed at run time,
/// as exports do for the batch and sequence axes).
fn shape_values(
    graph: &GraphProto,
    index: &Index,
    consts: &Consts,
    value: &str,
) -> Option<Vec<Option<i64>>> {
    if let Some(t) = consts.get(value) {
        return Some(
            tensor_values(t)?
                .into_iter()
                .map(|v| Some(v as i64))
                .collect(),
        );
    }
    let &p = index.producer.get(value)?;
    let concat = &graph.node[p];
    if concat.op_type != "Concat" {
        return None;
    }
    Some(
        concat
            .input
            .iter()
            .map(|piece| scalar(consts, piece).map(|v| v as i64))
            .collect(),
    )
}

/// Whether `value` is computed from the graph input `attention_mask` and constants
/// only, through the element-wise and shape ops exports use to turn it into an
/// additive mask: the fused op broadcasts it and nothing else.
fn from_attention_mask(graph: &GraphProto, index: &Index, consts: &Consts, value: &str) -> bool {
    const OPS: [&str; 9] = [
        "Unsqueeze",
        "Cast",
        "Sub",
        "Mul",
        "Add",
        "Where",
        "Equal",
        "Expand",
        "Constant",
    ];
    let mut todo = vec![value.to_string()];
    let mut seen = HashSet::new();
    let mut reaches_input = false;
    while let Some(v) = todo.pop() {
        if !seen.insert(v.clone()) {
            continue;
        }
        if v == "attention_mask" {
            reaches_input = true;
            continue;
        }
        match index.producer.get(&v) {
            Some(&p) => {
                let n = &graph.node[p];
                if !OPS.contains(&n.op_type.as_str()) {
                    return false;
                }
                todo.extend(n.input.iter().filter(|i| !i.is_empty()).cloned());
            }
            // An initializer; any other graph input is not the mask.
            None if consts.contains(&v) => {}
            None => return false,
        }
    }
    reaches_input
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
