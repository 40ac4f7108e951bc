// A small JSON Schema checker for the structured-output panel: the keywords a schema for an
// LLM reply uses (type, enum, const, properties, required, additionalProperties, items,
// lengths, bounds, pattern, anyOf/oneOf/allOf, local $ref). Returns a list of problems.

const TYPES = {
  object: (v) => v !== null && typeof v === "object" && !Array.isArray(v),
  array: Array.isArray,
  string: (v) => typeof v === "string",
  number: (v) => typeof v === "number",
  integer: Number.isInteger,
  boolean: (v) => typeof v === "boolean",
  null: (v) => v === null,
};

function resolve(ref, root) {
  if (!ref.startsWith("#/")) throw new Error(`cannot follow $ref ${ref}`);
  return ref.slice(2).split("/").reduce((node, part) => node?.[part.replace(/~1/g, "/").replace(/~0/g, "~")], root);
}

export function validate(value, schema, root = schema, path = "$") {
  if (schema === true || schema === undefined) return [];
  if (schema === false) return [`${path}: no value allowed`];
  if (schema.$ref) return validate(value, resolve(schema.$ref, root), root, path);
  const errors = [];
  const types = schema.type === undefined ? null : [].concat(schema.type);
  if (types && !types.some((t) => TYPES[t]?.(value))) {
    return [`${path}: expected ${types.join(" or ")}, got ${JSON.stringify(value)}`];
  }
  if (schema.enum && !schema.enum.some((e) => JSON.stringify(e) === JSON.stringify(value))) {
    errors.push(`${path}: not one of ${JSON.stringify(schema.enum)}`);
  }
  if ("const" in schema && JSON.stringify(schema.const) !== JSON.stringify(value)) {
    errors.push(`${path}: must be ${JSON.stringify(schema.const)}`);
  }
  if (typeof value === "string") {
    if (schema.minLength !== undefined && [...value].length < schema.minLength) errors.push(`${path}: shorter than ${schema.minLength}`);
    if (schema.maxLength !== undefined && [...value].length > schema.maxLength) errors.push(`${path}: longer than ${schema.maxLength}`);
    if (schema.pattern && !new RegExp(schema.pattern, "u").test(value)) errors.push(`${path}: does not match ${schema.pattern}`);
  }
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) errors.push(`${path}: below ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) errors.push(`${path}: above ${schema.maximum}`);
    if (schema.exclusiveMinimum !== undefined && value <= schema.exclusiveMinimum) errors.push(`${path}: not above ${schema.exclusiveMinimum}`);
    if (schema.exclusiveMaximum !== undefined && value >= schema.exclusiveMaximum) errors.push(`${path}: not below ${schema.exclusiveMaximum}`);
  }
  if (Array.isArray(value)) {
    if (schema.minItems !== undefined && value.length < schema.minItems) errors.push(`${path}: fewer than ${schema.minItems} items`);
    if (schema.maxItems !== undefined && value.length > schema.maxItems) errors.push(`${path}: more than ${schema.maxItems} items`);
    if (schema.items !== undefined) value.forEach((item, i) => errors.push(...validate(item, schema.items, root, `${path}[${i}]`)));
  }
  if (TYPES.object(value)) {
    const properties = schema.properties || {};
    for (const name of schema.required || []) {
      if (!(name in value)) errors.push(`${path}: missing "${name}"`);
    }
    for (const [name, item] of Object.entries(value)) {
      if (name in properties) errors.push(...validate(item, properties[name], root, `${path}.${name}`));
      else if (schema.additionalProperties === false) errors.push(`${path}: unexpected "${name}"`);
      else if (typeof schema.additionalProperties === "object") errors.push(...validate(item, schema.additionalProperties, root, `${path}.${name}`));
    }
  }
  for (const part of schema.allOf || []) errors.push(...validate(value, part, root, path));
  if (schema.anyOf && !schema.anyOf.some((part) => !validate(value, part, root, path).length)) {
    errors.push(`${path}: matches none of anyOf`);
  }
  if (schema.oneOf && schema.oneOf.filter((part) => !validate(value, part, root, path).length).length !== 1) {
    errors.push(`${path}: does not match exactly one of oneOf`);
  }
  return errors;
}
