declare const __FLEET_VERSION__: string | undefined;

/** Set by the bundler (esbuild `define`) and by vitest; "0.0.0-dev" when run from source otherwise. */
export const AGENT_VERSION: string = typeof __FLEET_VERSION__ === "string" ? __FLEET_VERSION__ : "0.0.0-dev";
