//! Attribute-value helpers and an expression builder that aliases every
//! attribute name (`#name`), so no reserved word ever reaches DynamoDB bare.

use std::collections::HashMap;
use std::str::FromStr;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::store::{StoreError, StoreResult};

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(super) fn b(v: bool) -> AttributeValue {
    AttributeValue::Bool(v)
}

pub(super) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

pub(super) fn get_s<'a>(item: &'a Item, attr: &str) -> Option<&'a str> {
    item.get(attr)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

pub(super) fn get_n<T: FromStr>(item: &Item, attr: &str) -> Option<T> {
    item.get(attr)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

pub(super) fn get_b(item: &Item, attr: &str) -> bool {
    matches!(item.get(attr), Some(AttributeValue::Bool(true)))
}

pub(super) fn req_s(item: &Item, attr: &str) -> StoreResult<String> {
    get_s(item, attr)
        .map(str::to_string)
        .ok_or_else(|| corrupt(item, attr))
}

pub(super) fn req_n<T: FromStr>(item: &Item, attr: &str) -> StoreResult<T> {
    get_n(item, attr).ok_or_else(|| corrupt(item, attr))
}

fn corrupt(item: &Item, attr: &str) -> StoreError {
    StoreError::Backend(format!(
        "corrupt item {:?}/{:?}: attribute {attr} is missing or mistyped",
        get_s(item, "pk").unwrap_or("?"),
        get_s(item, "sk").unwrap_or("?")
    ))
}

/// Builds update and condition expressions with every name aliased.
#[derive(Debug, Default)]
pub(super) struct Expr {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    sets: Vec<String>,
    removes: Vec<String>,
    conds: Vec<String>,
}

impl Expr {
    pub fn new() -> Expr {
        Expr::default()
    }

    /// `#attr`, registered.
    pub fn name(&mut self, attr: &str) -> String {
        let alias = format!("#{attr}");
        self.names.insert(alias.clone(), attr.to_string());
        alias
    }

    /// `:vN`, registered.
    pub fn value(&mut self, v: AttributeValue) -> String {
        let alias = format!(":v{}", self.values.len());
        self.values.insert(alias.clone(), v);
        alias
    }

    pub fn set(&mut self, attr: &str, v: AttributeValue) -> &mut Self {
        let (name, value) = (self.name(attr), self.value(v));
        self.sets.push(format!("{name} = {value}"));
        self
    }

    /// `SET #attr = <raw>` where `raw` was built with `name`/`value`.
    pub fn set_raw(&mut self, attr: &str, raw: String) -> &mut Self {
        let name = self.name(attr);
        self.sets.push(format!("{name} = {raw}"));
        self
    }

    pub fn remove(&mut self, attr: &str) -> &mut Self {
        let name = self.name(attr);
        self.removes.push(name);
        self
    }

    pub fn when_eq(&mut self, attr: &str, v: AttributeValue) -> &mut Self {
        let (name, value) = (self.name(attr), self.value(v));
        self.conds.push(format!("{name} = {value}"));
        self
    }

    pub fn when_absent(&mut self, attr: &str) -> &mut Self {
        let name = self.name(attr);
        self.conds.push(format!("attribute_not_exists({name})"));
        self
    }

    pub fn when_present(&mut self, attr: &str) -> &mut Self {
        let name = self.name(attr);
        self.conds.push(format!("attribute_exists({name})"));
        self
    }

    /// A raw condition built with `name`/`value`.
    pub fn when(&mut self, raw: String) -> &mut Self {
        self.conds.push(raw);
        self
    }

    pub fn update_expression(&self) -> String {
        let mut out = String::new();
        if !self.sets.is_empty() {
            out.push_str("SET ");
            out.push_str(&self.sets.join(", "));
        }
        if !self.removes.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("REMOVE ");
            out.push_str(&self.removes.join(", "));
        }
        out
    }

    pub fn condition(&self) -> Option<String> {
        (!self.conds.is_empty()).then(|| self.conds.join(" AND "))
    }

    pub fn names(&self) -> Option<HashMap<String, String>> {
        (!self.names.is_empty()).then(|| self.names.clone())
    }

    pub fn values(&self) -> Option<HashMap<String, AttributeValue>> {
        (!self.values.is_empty()).then(|| self.values.clone())
    }
}
