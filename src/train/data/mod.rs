//! The data: the synthetic AlignX-style world, its 90 dimensions, the importer of real AlignX
//! files, and the teacher that writes the cold start's reasoning.

pub mod alignx;
pub mod dims;
pub mod synth;
pub mod teacher;
