// Young generations of the threads that hold thousands of devices' messages in flight. V8's
// default (16 MiB semi-spaces, fixed when it starts) lets a scavenge meet mostly live objects —
// a job held until the device's PUBACK, a status until its fsync — and copy them, twice. Only a
// worker thread can be given another size (`resourceLimits`); the main thread keeps what node
// was started with.

/** A simulator thread: 3 semi-spaces of 64 MiB (thousands of agents in one thread). */
export const YOUNG_GENERATION_MB = 192;

/**
 * The server thread: 3 semi-spaces of 32 MiB. B1 at 2,000 devices: server CPU per job 160 µs
 * against 180-200 µs with the default, with the resident memory per registered device of B6
 * unchanged (893 B against 864 B); 64 MiB semi-spaces saved no more CPU and nearly doubled
 * that (1,625 B).
 */
export const SERVER_YOUNG_GENERATION_MB = 96;
