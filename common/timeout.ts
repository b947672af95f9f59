// Waiting on something that may never finish (a graceful MQTT end while the broker is gone,
// a broker closing 10,000 clients) without waiting forever.

/** Resolves true when `p` settles within `ms`, false when the time ran out first. */
export function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.then(
      () => true,
      () => true,
    ),
    new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
