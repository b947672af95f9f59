// 64-bit fields carry millisecond times and sequence numbers, all far below 2^53: decode them
// as plain numbers, not Long objects. Must run before the generated code is evaluated, so
// proto/index.ts imports this module first.
import protobuf from "protobufjs/minimal.js";

protobuf.util.Long = undefined as never;
protobuf.configure();
