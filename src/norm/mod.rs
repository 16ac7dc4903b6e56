//! One module per normalization family. Each exposes plain Rust functions over ndarray views,
//! generic over the element type; the Python bindings in `src/python/` mirror this layout.

pub mod batch;
pub mod common;
pub mod frn;
pub mod gdn;
pub mod group;
pub mod instance;
pub mod iternorm;
pub mod layer;
pub mod lp;
pub mod lrn;
pub mod mixing;
pub mod moments;
pub mod mvn;
pub mod rms;
pub mod whiten;

pub use batch::{batch_norm, BatchNormOutput, BatchNormParams, MomentumConvention};
pub use common::GroupStats;
pub use frn::{
    filter_response_norm, filter_response_norm_backward, tlu, tlu_backward, FrnGrads, FrnParams,
};
pub use gdn::{gdn, gdn_backward, GdnGrads, GdnParams, GdnVariant};
pub use group::group_norm;
pub use instance::{instance_norm, InstanceNormOutput, InstanceNormParams};
pub use layer::layer_norm;
pub use lp::{normalize, normalize_backward};
pub use lrn::{local_response_norm, local_response_norm_backward, LrnParams, LrnWindow};
pub use moments::{moments, Moments};
pub use mvn::{mean_variance_norm, mean_variance_norm_backward};
pub use rms::rms_norm;
pub mod grad;
pub use batch::{batch_norm_backward, BatchNormBackwardParams};
pub use grad::{ParamGrads, StatsIn};
pub use group::group_norm_backward;
pub use instance::{instance_norm_backward, InstanceNormBackwardParams};
pub use layer::layer_norm_backward;
pub use rms::rms_norm_backward;
