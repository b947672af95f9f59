// Label selectors (Kubernetes-like): `k=v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`; comma = and.

export type LabelRequirement =
  | { key: string; op: "=" | "!="; value: string }
  | { key: string; op: "in" | "notin"; values: string[] }
  | { key: string; op: "exists" | "!exists" };

export class SelectorError extends Error {
  constructor(
    message: string,
    readonly column: number,
    readonly input: string,
  ) {
    super(`selector: ${message} at column ${column}\n  ${input}\n  ${" ".repeat(Math.max(0, column - 1))}^`);
    this.name = "SelectorError";
  }
}

const WORD = /[A-Za-z0-9._/-]/;

export function parseSelector(input: string): LabelRequirement[] {
  const reqs: LabelRequirement[] = [];
  let i = 0;
  const ws = () => {
    while (input[i] === " ") i++;
  };
  const word = (what: string) => {
    ws();
    const start = i;
    while (i < input.length && WORD.test(input[i]!)) i++;
    if (i === start) throw new SelectorError(`expected ${what}`, i + 1, input);
    return input.slice(start, i);
  };
  const expect = (ch: string) => {
    ws();
    if (input[i] !== ch) throw new SelectorError(`expected '${ch}'`, i + 1, input);
    i++;
  };
  ws();
  if (i === input.length) return reqs;
  for (;;) {
    ws();
    if (input[i] === "!") {
      i++;
      reqs.push({ key: word("label key"), op: "!exists" });
    } else {
      const key = word("label key");
      ws();
      if (input.startsWith("!=", i)) {
        i += 2;
        reqs.push({ key, op: "!=", value: word("value") });
      } else if (input.startsWith("==", i) || input[i] === "=") {
        i += input.startsWith("==", i) ? 2 : 1;
        reqs.push({ key, op: "=", value: word("value") });
      } else if (/^(in|notin)\s*\(/.test(input.slice(i))) {
        const op = input.startsWith("notin", i) ? "notin" : "in";
        i += op.length;
        expect("(");
        const values = [word("value")];
        ws();
        while (input[i] === ",") {
          i++;
          values.push(word("value"));
          ws();
        }
        expect(")");
        reqs.push({ key, op, values });
      } else {
        reqs.push({ key, op: "exists" });
      }
    }
    ws();
    if (i === input.length) return reqs;
    if (input[i] !== ",") throw new SelectorError(`unexpected '${input[i]}'`, i + 1, input);
    i++;
  }
}

export function matchesSelector(
  reqs: readonly LabelRequirement[],
  labels: Readonly<Record<string, string>>,
): boolean {
  return reqs.every((r) => {
    const v = Object.hasOwn(labels, r.key) ? labels[r.key] : undefined;
    switch (r.op) {
      case "=":
        return v === r.value;
      case "!=":
        return v !== r.value;
      case "in":
        return v !== undefined && r.values.includes(v);
      case "notin":
        return v === undefined || !r.values.includes(v);
      case "exists":
        return v !== undefined;
      case "!exists":
        return v === undefined;
      default:
        return false;
    }
  });
}
