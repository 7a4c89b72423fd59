// One module that re-exports handlers of others: deploy with --handler index.helloGet.
module.exports = {
  helloGet: require('./helloget').foo,
  helloWithData: require('./hellowithdata').handler,
}
