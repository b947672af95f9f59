// Validation problems (zod issues) as text: every problem at once, each as `path: message`.
import type { z } from "zod";

export function bullets(problems: readonly string[]): string {
  return problems.map((p) => `  - ${p}`).join("\n");
}

/** Every problem in one list, each as `path: message`. */
export function formatIssues(issues: readonly z.core.$ZodIssue[]): string[] {
  return issues.map((i) => `${i.path.length ? i.path.join(".") : "(root)"}: ${i.message}`);
}
