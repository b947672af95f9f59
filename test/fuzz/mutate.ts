// A small, seeded mutator for the fuzz campaign: the same seed gives the same inputs, so a
// failure is reproduced with FLEET_FUZZ_SEED. Mutations are the usual ones (bit flips, byte
// edits, truncation, splicing, length tampering, random bytes) over a corpus of valid messages.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

export type Rng = () => number;

/** mulberry32: a tiny seeded PRNG. */
export function rng(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const int = (r: Rng, n: number) => Math.floor(r() * n);

export function mutate(r: Rng, seeds: readonly Uint8Array[]): Buffer {
  const pick = () => Buffer.from(seeds[int(r, seeds.length)]!);
  let b = pick();
  const rounds = 1 + int(r, 4);
  for (let i = 0; i < rounds; i++) {
    switch (int(r, 9)) {
      case 0: // flip bits
        if (b.length) b[int(r, b.length)]! ^= 1 << int(r, 8);
        break;
      case 1: // set a byte to an interesting value
        if (b.length) b[int(r, b.length)] = [0, 0x7f, 0x80, 0xff, 0x0a, 0x12][int(r, 6)]!;
        break;
      case 2: // truncate
        b = b.subarray(0, int(r, b.length + 1));
        break;
      case 3: // insert random bytes
        {
          const at = int(r, b.length + 1);
          const ins = Buffer.from(Array.from({ length: 1 + int(r, 16) }, () => int(r, 256)));
          b = Buffer.concat([b.subarray(0, at), ins, b.subarray(at)]);
        }
        break;
      case 4: // delete a run
        {
          const at = int(r, b.length + 1);
          b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + int(r, 8))]);
        }
        break;
      case 5: // splice two seeds
        {
          const o = pick();
          b = Buffer.concat([b.subarray(0, int(r, b.length + 1)), o.subarray(int(r, o.length + 1))]);
        }
        break;
      case 6: // a huge varint where a length was
        if (b.length > 2) {
          const at = 1 + int(r, b.length - 1);
          b = Buffer.concat([b.subarray(0, at), Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]), b.subarray(at)]);
        }
        break;
      case 7: // duplicate a run (repeated fields, nested messages)
        {
          const at = int(r, b.length + 1);
          const run = b.subarray(at, at + 1 + int(r, 32));
          b = Buffer.concat([b.subarray(0, at), run, run, b.subarray(at)]);
        }
        break;
      default: // pure noise
        b = Buffer.from(Array.from({ length: int(r, 64) }, () => int(r, 256)));
    }
  }
  return b;
}

/** Saved inputs (reproducers of earlier findings, hand-made edge cases) in test/fuzz/corpus. */
export function savedCorpus(): Buffer[] {
  const dir = join(import.meta.dirname, "corpus");
  return readdirSync(dir)
    .filter((f) => f.endsWith(".bin"))
    .map((f) => readFileSync(join(dir, f)));
}
