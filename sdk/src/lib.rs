//! Write ipvs-operator weight policies in Rust.
//!
//! A policy is a type that implements [`Policy`], exported with [`export_policy!`]:
//!
//! ```
//! #![cfg_attr(target_family = "wasm", no_std)]
//! use ipvs_policy_sdk::prelude::*;
//!
//! pub struct Everyone;
//! impl Policy for Everyone {
//!     fn evaluate(input: &Input) -> Result<Decision, String> {
//!         Ok(Decision::new(input.endpoints.iter().map(|_| 1).collect()))
//!     }
//! }
//! export_policy!(Everyone);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`; the `.wasm` file
//! is a component that exports `ipvs-operator:policy/evaluator` (and `metadata`) and imports
//! nothing. On wasm the SDK supplies the allocator and the panic handler (a panic
//! is a trap, which the host reports), which is why policies are `no_std` there:
//! the standard library would import WASI, and the host grants no imports.
//! On the host (`cargo test`), policies use `std` and the [`testing`] harness.
#![no_std]
#![warn(missing_docs)]

#[doc(hidden)]
pub extern crate alloc as __alloc;
extern crate alloc;
#[cfg(not(target_family = "wasm"))]
extern crate std;

/// The types and exports generated from `wit/policy/policy.wit`.
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit/policy",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_policy_bindings",
        default_bindings_module: "ipvs_policy_sdk::bindings",
        additional_derives: [PartialEq, Eq],
    });
}

pub mod config;
pub mod groups;
pub mod metadata;
pub mod selector;
pub mod share;
#[cfg(not(target_family = "wasm"))]
pub mod testing;
pub mod time;
pub mod validate;

#[cfg(target_family = "wasm")]
mod wasm_runtime;

pub use bindings::exports::ipvs_operator::policy::evaluator::{
    Conditions, Decision, Endpoint, Input, Label, Location, Node, Service, Timestamp, WeightGroup,
};

/// The version of the policy interface this SDK implements: the package
/// version of `wit/policy/policy.wit`, read by the build script.
pub const INTERFACE_VERSION: &str = env!("IPVS_POLICY_INTERFACE_VERSION");

/// The largest weight a policy may return. The kernel takes a u32, but kube-proxy
/// reads IPVS weights as 16 bits, so anything larger would look wrong to it.
pub const MAX_WEIGHT: u32 = 65535;

/// A weight policy: a pure function from [`Input`] to [`Decision`].
pub trait Policy {
    /// Compute one weight per endpoint of `input.endpoints`, in the same order.
    ///
    /// An `Err` is a reason for people; the host keeps the last good weights.
    fn evaluate(input: &Input) -> Result<Decision, alloc::string::String>;
}

impl Decision {
    /// A decision with these weights, no requeue and no message.
    pub fn new(weights: alloc::vec::Vec<u32>) -> Self {
        Decision {
            weights,
            requeue_after_ms: None,
            message: None,
        }
    }

    /// Ask to be evaluated again after `ms` milliseconds.
    pub fn requeue_after_ms(mut self, ms: u64) -> Self {
        self.requeue_after_ms = Some(ms);
        self
    }

    /// Attach a message for status and events.
    pub fn message(mut self, message: impl Into<alloc::string::String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

impl Endpoint {
    /// Ready to receive new connections (and not terminating).
    pub fn is_ready(&self) -> bool {
        self.conditions.contains(Conditions::READY)
    }

    /// Able to serve, possibly while terminating.
    pub fn is_serving(&self) -> bool {
        self.conditions.contains(Conditions::SERVING)
    }

    /// Being deleted.
    pub fn is_terminating(&self) -> bool {
        self.conditions.contains(Conditions::TERMINATING)
    }
}

impl Input {
    /// The labels of `endpoint`'s pod (from `label_sets`).
    pub fn labels(&self, endpoint: &Endpoint) -> &[Label] {
        self.label_sets
            .get(endpoint.label_set as usize)
            .map_or(&[], |set| set.as_slice())
    }

    /// The node (and zone) `endpoint` runs on, if known (from `locations`).
    pub fn location(&self, endpoint: &Endpoint) -> Option<&Location> {
        endpoint.location.and_then(|i| self.locations.get(i as usize))
    }
}

/// Export a [`Policy`] implementation as the component's `evaluator`, with
/// the `metadata` the host asks before it evaluates:
///
/// - `export_policy!(P)`: `describe` gives the crate's name, version and
///   description and no schema; `validate-config` accepts any JSON.
/// - `export_policy!(P, config = C)`, where `C` is a [`PolicyConfig`]
///   (`#[derive(Deserialize, JsonSchema)]`): `describe` gives `C`'s JSON
///   Schema; `validate-config` parses the config as `C` and runs
///   [`PolicyConfig::check`], and names the JSON path of what is wrong.
/// - `version = "2"` after either: the version `describe` gives instead of
///   the crate's (it must equal VERSION where the module is deployed as
///   `NAME.VERSION.wasm`).
///
/// Expands to nothing outside wasm, so the same crate builds natively for tests.
///
/// [`PolicyConfig`]: crate::metadata::PolicyConfig
/// [`PolicyConfig::check`]: crate::metadata::PolicyConfig::check
#[macro_export]
macro_rules! export_policy {
    ($policy:ty $(, config = $config:ty)? $(, version = $version:expr)? $(,)?) => {
        $crate::__export_policy!(
            $policy,
            $crate::__first_type!($($config,)? $crate::metadata::AnyConfig),
            $crate::__first_expr!($($version,)? ::core::env!("CARGO_PKG_VERSION"))
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __first_type {
    ($first:ty $(, $rest:ty)*) => { $first };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __first_expr {
    ($first:expr $(, $rest:expr)*) => { $first };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_policy {
    ($policy:ty, $config:ty, $version:expr) => {
        #[cfg(target_family = "wasm")]
        const _: () = {
            use $crate::bindings::exports::ipvs_operator::policy::metadata as __metadata;
            struct __PolicyExport;
            impl $crate::bindings::exports::ipvs_operator::policy::evaluator::Guest for __PolicyExport {
                fn evaluate(
                    input: $crate::Input,
                ) -> ::core::result::Result<$crate::Decision, $crate::__alloc::string::String> {
                    <$policy as $crate::Policy>::evaluate(&input)
                }
            }
            impl __metadata::Guest for __PolicyExport {
                fn describe() -> __metadata::Description {
                    $crate::metadata::describe::<$config>(
                        ::core::env!("CARGO_PKG_NAME"),
                        $version,
                        ::core::env!("CARGO_PKG_DESCRIPTION"),
                    )
                }
                fn validate_config(
                    config: $crate::__alloc::string::String,
                ) -> ::core::result::Result<(), $crate::__alloc::vec::Vec<__metadata::ConfigError>> {
                    $crate::metadata::validate::<$config>(&config)
                }
            }
            $crate::bindings::__export_policy_bindings!(__PolicyExport with_types_in $crate::bindings);
        };
    };
}

/// What most policies need: `use ipvs_policy_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::config::{self, ConfigError};
    pub use crate::groups;
    pub use crate::metadata::PolicyConfig;
    pub use crate::selector::{self, LabelSelector};
    pub use crate::share::{self, Demand, Percent, Split};
    pub use crate::time::{self, Duration};
    pub use crate::{
        export_policy, Conditions, Decision, Endpoint, Input, Label, Location, Node, Policy,
        Service, Timestamp, WeightGroup, MAX_WEIGHT,
    };
    pub use alloc::borrow::ToOwned;
    pub use alloc::boxed::Box;
    pub use alloc::collections::BTreeMap;
    pub use alloc::format;
    pub use alloc::string::{String, ToString};
    pub use alloc::vec;
    pub use alloc::vec::Vec;
    pub use serde::Deserialize;
    // `#[derive(JsonSchema)]` refers to `schemars::…`: this brings the SDK's
    // into scope, so a policy needs no dependency of its own.
    pub use schemars::{self, JsonSchema};
}
