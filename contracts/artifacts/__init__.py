"""The compiled contracts (ABI and bytecode, written by contracts/build.js), installed as the
package data of `fedllm.contracts` so that a wheel install has them too."""
