//! Reader of the CTranslate2 model container (`model.bin`), enough to load Whisper with candle.
//!
//! Layout (little endian), as written by CTranslate2's converter, binary version 2..=6:
//! `u32 version`, then (version >= 2) `string spec`, `u32 spec_revision`; `u32 n_variables`,
//! each `string name`, `u8 rank`, `u32 dims[rank]`, `u8 dtype` + `u32 n_bytes` (version >= 4;
//! before: `u8 item_size` + `u32 n_items`), the raw data; then (version >= 3) `u32 n_aliases`,
//! each `string alias`, `string target`. A string is a `u16` length including a trailing NUL.

use std::collections::HashMap;
use std::io::{self, Read};

use candle_core::{DType, Device, Tensor};

/// One stored variable.
#[derive(Debug, Clone)]
pub struct Variable {
    pub shape: Vec<usize>,
    pub dtype: Ct2Type,
    pub data: Vec<u8>,
}

/// CTranslate2's `DataType` ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Type {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Type {
    fn from_id(id: u8) -> io::Result<Ct2Type> {
        Ok(match id {
            0 => Ct2Type::F32,
            1 => Ct2Type::I8,
            2 => Ct2Type::I16,
            3 => Ct2Type::I32,
            4 => Ct2Type::F16,
            5 => Ct2Type::Bf16,
            other => return Err(invalid(format!("unknown CTranslate2 dtype id {other}"))),
        })
    }

    fn from_item_size(size: u8) -> io::Result<Ct2Type> {
        Ok(match size {
            1 => Ct2Type::I8,
            2 => Ct2Type::I16,
            4 => Ct2Type::F32,
            other => return Err(invalid(format!("unknown CTranslate2 item size {other}"))),
        })
    }
}

/// The whole container: the model spec name and every variable by name (aliases resolved).
#[derive(Debug)]
pub struct Ct2Model {
    pub spec: String,
    pub variables: HashMap<String, Variable>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn u8_(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn u16_(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn u32_(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn string(r: &mut impl Read) -> io::Result<String> {
    let len = u16_(r)? as usize;
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    if b.last() == Some(&0) {
        b.pop();
    }
    String::from_utf8(b).map_err(|e| invalid(format!("variable name is not UTF-8: {e}")))
}

impl Ct2Model {
    pub fn read(r: &mut impl Read) -> io::Result<Ct2Model> {
        let version = u32_(r)?;
        if !(1..=6).contains(&version) {
            return Err(invalid(format!(
                "unsupported CTranslate2 binary version {version}"
            )));
        }
        let spec = if version >= 2 {
            let spec = string(r)?;
            let _revision = u32_(r)?;
            spec
        } else {
            String::new()
        };
        let n = u32_(r)?;
        let mut variables = HashMap::with_capacity(n as usize);
        for _ in 0..n {
            let name = string(r)?;
            let rank = u8_(r)? as usize;
            let shape = (0..rank)
                .map(|_| u32_(r).map(|d| d as usize))
                .collect::<io::Result<Vec<_>>>()?;
            let (dtype, n_bytes) = if version >= 4 {
                let dtype = Ct2Type::from_id(u8_(r)?)?;
                (dtype, u32_(r)? as usize)
            } else {
                let size = u8_(r)?;
                (
                    Ct2Type::from_item_size(size)?,
                    u32_(r)? as usize * size as usize,
                )
            };
            let mut data = vec![0u8; n_bytes];
            r.read_exact(&mut data)?;
            variables.insert(name, Variable { shape, dtype, data });
        }
        if version >= 3 {
            let n_aliases = u32_(r)?;
            for _ in 0..n_aliases {
                let alias = string(r)?;
                let target = string(r)?;
                let var = variables
                    .get(&target)
                    .ok_or_else(|| invalid(format!("alias {alias} names missing {target}")))?
                    .clone();
                variables.insert(alias, var);
            }
        }
        Ok(Ct2Model { spec, variables })
    }

    /// A variable as an f32 tensor on the CPU (floating types only).
    pub fn tensor(&self, name: &str) -> io::Result<Tensor> {
        let v = self
            .variables
            .get(name)
            .ok_or_else(|| invalid(format!("model.bin has no variable {name}")))?;
        let (dtype, elem) = match v.dtype {
            Ct2Type::F32 => (DType::F32, 4),
            Ct2Type::F16 => (DType::F16, 2),
            Ct2Type::Bf16 => (DType::BF16, 2),
            other => return Err(invalid(format!("{name}: expected floats, found {other:?}"))),
        };
        let count: usize = v.shape.iter().product::<usize>().max(1);
        if count * elem != v.data.len() {
            return Err(invalid(format!("{name}: size does not match shape")));
        }
        let shape: Vec<usize> = if v.shape.is_empty() {
            vec![1]
        } else {
            v.shape.clone()
        };
        Tensor::from_raw_buffer(&v.data, dtype, &shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| invalid(format!("{name}: {e}")))
    }

    /// A scalar integer variable (`num_heads`).
    pub fn int(&self, name: &str) -> io::Result<i64> {
        let v = self
            .variables
            .get(name)
            .ok_or_else(|| invalid(format!("model.bin has no variable {name}")))?;
        let d = &v.data;
        Ok(match (v.dtype, d.len()) {
            (Ct2Type::I8, 1) => d[0] as i8 as i64,
            (Ct2Type::I16, 2) => i16::from_le_bytes([d[0], d[1]]) as i64,
            (Ct2Type::I32, 4) => i32::from_le_bytes([d[0], d[1], d[2], d[3]]) as i64,
            _ => return Err(invalid(format!("{name}: not a scalar integer"))),
        })
    }
}
