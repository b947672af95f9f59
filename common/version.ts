declare const __FLEET_VERSION__: string | undefined;
declare const __FLEET_BUILD_TIME__: number | undefined;

/** Set by the bundler (esbuild `define`) and by vitest; "0.0.0-dev" when run from source otherwise. */
export const AGENT_VERSION: string = typeof __FLEET_VERSION__ === "string" ? __FLEET_VERSION__ : "0.0.0-dev";

/**
 * No correct clock reads earlier than the agent's build: the initial time floor, so that a
 * device booting at 1970 knows its clock is wrong (the idea of systemd's build-time floor).
 */
export const BUILD_TIME_FLOOR: number =
  typeof __FLEET_BUILD_TIME__ === "number" ? __FLEET_BUILD_TIME__ : Date.parse("2026-11-01T00:00:00Z");
