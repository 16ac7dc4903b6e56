//! One module per normalization family. Each exposes plain Rust functions over ndarray views,
//! generic over the element type; the Python bindings in `src/python/` mirror this layout.

pub mod batch;
pub mod common;
pub mod group;
pub mod instance;
pub mod iternorm;
pub mod layer;
pub mod moments;
pub mod rms;
pub mod whiten;

pub use batch::{batch_norm, BatchNormOutput, BatchNormParams, MomentumConvention};
pub use common::GroupStats;
pub use group::group_norm;
pub use instance::{instance_norm, InstanceNormOutput, InstanceNormParams};
pub use layer::layer_norm;
pub use moments::{moments, Moments};
pub use rms::rms_norm;
pub mod grad;
pub use batch::{batch_norm_backward, BatchNormBackwardParams};
pub use grad::{ParamGrads, StatsIn};
pub use group::group_norm_backward;
pub use instance::{instance_norm_backward, InstanceNormBackwardParams};
pub use layer::layer_norm_backward;
pub use rms::rms_norm_backward;
