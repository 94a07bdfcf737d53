//! ONNX Runtime inputs from candle tensors and id rows, and the comparison of an output with
//! candle's, for the tests that check an export against candle.

use candle_core::Tensor;
use ort::session::{SessionInputValue, SessionOutputs};

pub fn ort_i64(rows: &[Vec<u32>]) -> SessionInputValue<'static> {
    let shape = vec![rows.len() as i64, rows[0].len() as i64];
    let data: Vec<i64> = rows.iter().flatten().map(|&v| v as i64).collect();
    ort::value::Tensor::from_array((shape, data)).unwrap().into()
}

pub fn ort_f32(t: &Tensor) -> SessionInputValue<'static> {
    let shape: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    ort::value::Tensor::from_array((shape, data)).unwrap().into()
}

/// Max |onnx - candle| after checking the shapes agree.
pub fn max_diff(outputs: &SessionOutputs, name: &str, expected: &Tensor) -> f32 {
    let (shape, data) = outputs[name].try_extract_tensor::<f32>().unwrap();
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    assert_eq!(dims, expected.dims(), "{name} shape");
    let want = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    data.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}
